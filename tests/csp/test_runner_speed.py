"""The runner's fast path: host-side token counts (no device reads), the gather-based scatter and
the compiled path give exactly what the device-read eager path gives.

Host synchronisations are counted on the CPU by wrapping the Tensor methods that read a device
value on the host (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``nonzero``, ``cpu``,
``numpy``) with pytest's monkeypatch, inside the test only.
"""

from __future__ import annotations

import random

import pytest
import torch

from csp.runner import CompileOptions, DecoderInputs, StageRunner
from csp.schedule import StageSchedule
from csp.tokens import TokenState
from tests.csp.test_csp_oracle import MODELS, random_batch, random_schedule

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")


@pytest.fixture
def sync_counter(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts calls of the host-reading Tensor methods while the test runs (restored after)."""
    counts: dict[str, int] = {}
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts


def make_inputs(case: int, host: bool, n_img: int = 24):
    rng = random.Random(500 + case)
    llm = MODELS["mha6"]
    batch = 1 + case % 3
    embeds, valid, is_image, qrows, qvalid, lengths, _, _ = random_batch(rng, batch, n_img, llm.config.hidden_size)
    schedule = random_schedule(rng, len(llm.layers), n_img)
    keep = torch.stack([torch.tensor(sorted(rng.sample(range(n_img), schedule.Nc))) for _ in range(batch)])
    inputs = DecoderInputs(embeds, valid, is_image, qrows, qvalid, cluster_keep=keep,
                           lengths=lengths if host else None, image_counts=[n_img] * batch if host else None)
    return llm, schedule, inputs, n_img


def records(out) -> list[tuple[list[int], list[int]]]:
    return [(r.image_tokens, r.total_tokens) for r in out.records]


def assert_same_output(a, b) -> None:
    assert torch.equal(a.state.valid, b.state.valid) and torch.equal(a.state.positions, b.state.positions)
    assert torch.allclose(a.state.hidden[a.state.valid], b.state.hidden[b.state.valid], atol=1e-5, rtol=1e-5)
    assert records(a) == records(b)
    assert [(k.stage, k.first_layer) for k in a.kept_image_tokens] == [(k.stage, k.first_layer)
                                                                        for k in b.kept_image_tokens]
    for ka, kb in zip(a.kept_image_tokens, b.kept_image_tokens, strict=True):
        assert torch.equal(ka.indices, kb.indices)


@pytest.mark.parametrize("case", range(12))
def test_host_counts_give_the_device_read_result(case: int) -> None:
    llm, schedule, host_inputs, n_img = make_inputs(case, host=True)
    _, _, device_inputs, _ = make_inputs(case, host=False)
    with torch.no_grad():
        for method in (None, schedule):
            runner = StageRunner(llm, method, n_img, always_move_tokens=case % 2 == 0)
            assert_same_output(runner.forward(host_inputs), runner.forward(device_inputs))


@pytest.mark.parametrize("batch_case", [0, 1, 2])  # batch 1, 2 (padded), 3 (padded)
@pytest.mark.parametrize("schedule", [None, StageSchedule(Lc=2, Nc=8, Ls=1, Np=4),
                                      StageSchedule(Lc=0, Nc=24, Ls=3, Np=5)])
def test_forward_reads_nothing_from_the_device(sync_counter: dict[str, int], batch_case: int,
                                               schedule: StageSchedule | None) -> None:
    llm, _, inputs, n_img = make_inputs(batch_case, host=True)
    runner = StageRunner(llm, schedule, n_img)
    with torch.no_grad():
        runner.forward(inputs)
    assert sync_counter == {}


def test_without_host_counts_one_read_per_forward(sync_counter: dict[str, int]) -> None:
    llm, _, inputs, n_img = make_inputs(1, host=False)
    runner = StageRunner(llm, StageSchedule(Lc=2, Nc=8, Ls=1, Np=4), n_img)
    with torch.no_grad():
        runner.forward(inputs)
    assert sync_counter == {"tolist": 1}


def test_wrong_host_lengths_are_caught_on_the_device() -> None:
    llm, _, inputs, n_img = make_inputs(2, host=True)  # batch 3
    inputs.lengths = [n - 1 for n in inputs.lengths]  # one token fewer than the masks say
    with pytest.raises(RuntimeError, match="more kept tokens than the given length"), torch.no_grad():
        StageRunner(llm, StageSchedule(Lc=2, Nc=8, Ls=1, Np=4), n_img).forward(inputs)
    width = inputs.valid.shape[1]
    inputs.lengths = [width] * 3  # claims no padding where there is some
    with pytest.raises(RuntimeError, match="no padding"), torch.no_grad():
        StageRunner(llm, None, n_img).forward(inputs)


def test_scatter_into_writes_each_active_row_back() -> None:
    """Golden: rows 1 and 3 of sample 0 and row 2 of sample 1 are active (sample 1 padded)."""
    no = torch.zeros(2, 4, dtype=torch.bool)
    full = TokenState.full(torch.zeros(2, 4, 1), ~no, no)
    active = TokenState(hidden=torch.tensor([[[10.0], [30.0]], [[20.0], [99.0]]]),
                        positions=torch.tensor([[1, 3], [2, 0]]), valid=torch.tensor([[True, True], [True, False]]),
                        is_image=torch.zeros(2, 2, dtype=torch.bool), source=torch.full((2, 2), -1))
    out = active.scatter_into(full).hidden[..., 0]
    assert out.tolist() == [[0.0, 10.0, 0.0, 30.0], [0.0, 0.0, 20.0, 0.0]]


@pytest.mark.parametrize("bucket", [1, 16])
def test_compiled_path_equals_eager(bucket: int) -> None:
    """torch.compile with backend aot_eager (traces the graphs inductor would compile, without C++
    code generation, which takes minutes on this 2-core CPU); bucket 16 pads every stage."""
    torch._dynamo.reset()
    llm, schedule, inputs, n_img = make_inputs(2, host=True)  # batch 3, padded
    eager = StageRunner(llm, schedule, n_img)
    options = CompileOptions(enabled=True, backend="aot_eager", bucket=bucket)
    compiled = StageRunner(llm, schedule, n_img, compile=options)
    with torch.no_grad():
        ref, out = eager.forward(inputs), compiled.forward(inputs)
        again = compiled.forward(inputs)  # the second call replays the graphs
    for got in (out, again):
        assert records(got) == records(ref)
        for b in range(inputs.embeds.shape[0]):
            mine, theirs = got.state.valid[b], ref.state.valid[b]
            assert torch.equal(got.state.positions[b][mine], ref.state.positions[b][theirs])
            assert torch.allclose(got.state.hidden[b][mine], ref.state.hidden[b][theirs], atol=1e-5)
    if bucket > 1:
        assert out.state.hidden.shape[1] % bucket == 0


def test_compile_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="bucket"):
        CompileOptions(bucket=0)
    with pytest.raises(ValueError, match="unknown keys"):
        CompileOptions.from_mapping({"enabled": True, "buckets": 8})


@pytest.fixture(scope="module")
def tiny32():
    from model.builder import build_tiny_lisa

    return build_tiny_lisa(num_layers=32)  # the Table 1 presets are written for 32 layers


@pytest.mark.slow
def test_every_method_reads_the_device_at_most_once_per_forward(tiny32, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation's path (pipeline -> teacher_forced -> runner) for every registered method at its
    Table 1 setting: host reads inside the runner's forward, counted per forward."""
    import numpy as np
    from PIL import Image

    from csp.methods import METHODS, build_method
    from model.pipeline import Query, SegmentationPipeline
    from scripts.flops_table import load_method_presets
    from tests.csp.tiny_clip_text import tiny_text_side

    active, counts = [False], {}
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapped(*args, _original=original, **kwargs):
            if active[0]:
                counts["reads"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    forward = StageRunner.forward

    def counted(self, *args, **kwargs):
        active[0] = True
        try:
            return forward(self, *args, **kwargs)
        finally:
            active[0] = False

    monkeypatch.setattr(StageRunner, "forward", counted)
    # SAM's image encoder (1024 x 1024 input, seconds on a CPU) is outside what is counted here
    channels = tiny32.model.sam.prompt_encoder.embed_dim
    monkeypatch.setattr(tiny32.model.sam.image_encoder, "forward", lambda x: torch.zeros(1, channels, 64, 64))
    presets = load_method_presets()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    queries = [Query("the man on the left", False, "a"), Query("what can cut the bread", True, "b")]
    reads = {}
    for name in [None, *sorted(METHODS)]:
        spec = None if name is None else dict(presets.get(f"table1_{name}", (None, {"name": name}))[1])
        if name == "litelvlm":  # Table 1's preset reads CLIP's text tower from the (absent) LISA weights
            spec.pop("clip", None)
            spec["text_side"] = tiny_text_side(tiny32.model.vision_tower.config.hidden_size)
        method = None if spec is None else build_method(spec)
        pipe = SegmentationPipeline(tiny32, method=method)
        for batch in (1, 2):
            counts["reads"] = 0
            pipe.segment(image, queries[:batch])
            reads[(name, batch)] = counts["reads"]
    assert all(v <= 1 for v in reads.values()), reads
    assert reads[(None, 1)] == reads[(None, 2)] == reads[("csp", 1)] == reads[("csp", 2)] == 0
