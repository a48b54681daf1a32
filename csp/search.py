"""Schedule search: the (Lc, Nc, Ls, Np) settings that meet an efficiency target, ranked.

1. **Enumerate** every setting of a grid (Lc, Ls layers; Nc, Np from value lists) for a model
   (L, N, d, m) and keep those that meet the target by the evaluation's own calculator
   (:func:`csp.accounting.static_row`: Navg by eq. 9, TFLOPs by eqs. 10-11 with 62 text tokens):
   an image-token reduction ``1 - Navg / N >= r``, or ``TFLOPs <= t``. Settings that overshoot
   the target by more than ``tolerance`` are dropped (they give accuracy away for nothing).
2. **Rank** by the paper's heuristics (sections 4.3-4.4, Tables 4-6), as a lexicographic key,
   smaller first:

   a. ``depth_gap``: distance of the depth before pruning, Lc + Ls, from 42% of L (one layer
      either way is free). Table 6 keeps Lc + Ls = 14 of 32 layers (7B; 13-15 at 336 px) and 16
      of 40 (13B) at every ratio from 65% to 85%: the fine-grained stage ends ~0.4-0.44 L deep.
   b. ``-proxy``: an accuracy proxy in mIoU points, read off the ablations (7B, 224 px):
      ``1.25 * Ls * 32 / L`` (Table 5: at the same depth, Lc = 6, Ls = 8 beats Lc = 8, Ls = 6 by
      ~2.5 points: the fine-grained stage matters most) ``+ 1.75 * log2(Nc)`` (Table 4, Uniform:
      each doubling of Nc from 16 to 64 gains 1.6-1.9 points on average) ``+ 0.2 *
      log2(min(Np, 8))`` (Table 5: Np 4 -> 8 gains ~0.2 points, beyond 8 nothing) ``- log2(4 / Np)``
      for Np < 4 (below Table 5's range; Table 6 goes below 4 only at 90%). Rounded to
      0.1 point so that near-ties fall to the next keys. It reproduces Table 6's trend: as the
      reduction grows, Ls and Nc shrink together while Np stays small.
   c. ``np_penalty``: |log2(Np / 8)| rounded (Table 6 uses Np = 8 in 10 of its 18 settings).
   d. ``slack``: the setting closest to the target.

   Hard constraints (all of Table 6 satisfies them): a clustering stage (Lc >= 1, Nc < N), at
   least ``min_ls`` (default 1) scattering layers, a pruning stage (Lp >= 1, Np < N), Np <= Nc.
3. **Calibrate** (optional, beyond the paper's hand tuning): evaluate the top candidates with
   ``evaluation.evaluate.evaluate`` on a calibration split and return the accuracy-efficiency
   Pareto front (gIoU mean against measured TFLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csp.accounting import DEFAULT_TEXT_TOKENS, ModelDims, navg, static_row
from csp.schedule import StageSchedule
from csp.sweeps import schedule_override

#: Models of the configs (``configs/model/<name>.yaml``): decoder dims and N image tokens.
#: tiny: ``model.builder.tiny_llama_config`` (d = 64, m = 2d + 16, 6 layers), CLIP 224/14.
MODEL_SHAPES: dict[str, tuple[ModelDims, int]] = {
    "tiny": (ModelDims(hidden_size=64, intermediate_size=144, num_layers=6), 256),
    "llava7b_224": (ModelDims(hidden_size=4096, intermediate_size=11008, num_layers=32), 256),
    "llava7b_336": (ModelDims(hidden_size=4096, intermediate_size=11008, num_layers=32), 576),
    "llava13b_224": (ModelDims(hidden_size=5120, intermediate_size=13824, num_layers=40), 256),
    "toy_trained": (ModelDims(hidden_size=128, intermediate_size=256, num_layers=8), 64),  # configs/model/toy.yaml
}
#: Fraction of the layers before pruning that Table 6 settles on (14/32, 16/40).
DEPTH_FRACTION = 0.42
#: Pruning tokens Table 6 uses most.
TYPICAL_NP = 8


@dataclass(frozen=True)
class Target:
    """An efficiency target: ``reduction`` (fraction of image tokens removed on average per
    layer, 1 - Navg / N) or ``tflops`` (at most this many TFLOPs per sample); exactly one."""

    reduction: float | None = None
    tflops: float | None = None

    def __post_init__(self) -> None:
        if (self.reduction is None) == (self.tflops is None):
            raise ValueError("give exactly one target: a reduction (e.g. 0.7) or TFLOPs")
        if self.reduction is not None and not 0.0 < self.reduction < 1.0:
            raise ValueError(f"reduction must be in (0, 1), got {self.reduction}")
        if self.tflops is not None and self.tflops <= 0:
            raise ValueError(f"tflops must be > 0, got {self.tflops}")

    def describe(self) -> str:
        if self.reduction is not None:
            return f"{100 * self.reduction:g}% fewer image tokens"
        return f"<= {self.tflops:g} TFLOPs"


@dataclass
class Candidate:
    """One setting that meets the target, with the calculator's numbers and its rank key."""

    schedule: StageSchedule
    navg: float
    reduction: float
    tflops: float
    key: tuple = ()
    metrics: dict[str, Any] | None = field(default=None, repr=False)  # filled by calibration

    @property
    def label(self) -> str:
        s = self.schedule
        return f"lc{s.Lc}_nc{s.Nc}_ls{s.Ls}_np{s.Np}"


def default_nc_values(num_tokens: int) -> list[int]:
    """Multiples of 8 from 8 to N / 2 (Table 6's Nc are 16..128 of 256, 24..128 of 576)."""
    return list(range(8, num_tokens // 2 + 1, 8))


def default_np_values(num_tokens: int) -> list[int]:
    """Powers of two from 2 to 32 (Table 6's Np), below N."""
    return [v for v in (2, 4, 8, 16, 32) if v < num_tokens]


def meets(target: Target, reduction: float, tflops: float) -> bool:
    """Whether a setting with this reduction and these TFLOPs meets ``target``."""
    if target.reduction is not None:
        return reduction >= target.reduction
    return tflops <= target.tflops


def slack(target: Target, reduction: float, tflops: float) -> float:
    """How far past the target a setting is (fraction of N, or relative TFLOPs), >= 0 when it meets it."""
    if target.reduction is not None:
        return reduction - target.reduction
    return (target.tflops - tflops) / target.tflops


def accuracy_proxy(schedule: StageSchedule, num_layers: int) -> float:
    """The hand-read accuracy proxy of the module docstring (mIoU points, up to a constant)."""
    return (1.25 * schedule.Ls * 32 / num_layers + 1.75 * math.log2(schedule.Nc)
            + 0.2 * math.log2(min(schedule.Np, TYPICAL_NP)) - max(0.0, math.log2(4 / schedule.Np)))


def heuristic_key(schedule: StageSchedule, num_layers: int, slack_value: float) -> tuple:
    """The ranking key of the module docstring (smaller is better)."""
    depth_gap = max(0.0, abs(schedule.Lc + schedule.Ls - DEPTH_FRACTION * num_layers) - 1.0)
    np_penalty = round(abs(math.log2(schedule.Np / TYPICAL_NP)))
    return (round(depth_gap, 6), -round(accuracy_proxy(schedule, num_layers), 1), np_penalty, round(slack_value, 9))


def search(dims: ModelDims, num_tokens: int, target: Target, *, nc_values: Sequence[int] | None = None,
           np_values: Sequence[int] | None = None, min_ls: int = 1, tolerance: float = 0.03,
           text_tokens: int = DEFAULT_TEXT_TOKENS, clustering: str = "uniform",
           clustering_kwargs: Mapping[str, Any] | None = None) -> list[Candidate]:
    """All grid settings meeting ``target`` within ``tolerance``, best first (see the module doc).

    ``tolerance``: largest accepted overshoot (reduction points as a fraction, e.g. 0.03 = 3
    points; for a TFLOPs target, a fraction of it). Raises when nothing meets the target.
    """
    L, N = dims.num_layers, num_tokens
    nc_values = sorted(set(nc_values or default_nc_values(N)))
    np_values = sorted(set(np_values or default_np_values(N)))
    bad = [v for v in [*nc_values, *np_values] if not 1 <= v < N]
    if bad:
        raise ValueError(f"Nc / Np values must be in [1, N) = [1, {N}), got {bad}")
    out = []
    for lc in range(1, L):
        for ls in range(min_ls, L - lc):  # Lp = L - Lc - Ls >= 1
            for nc in nc_values:
                for np_ in np_values:
                    if np_ > nc:
                        continue
                    schedule = StageSchedule(Lc=lc, Nc=nc, Ls=ls, Np=np_, clustering=clustering,
                                             clustering_kwargs=dict(clustering_kwargs or {}))
                    if target.reduction is not None:  # cheap pre-check with the same per-layer counts
                        reduction = 1.0 - navg(schedule.image_tokens_per_layer(L, N)) / N
                        if not target.reduction <= reduction <= target.reduction + tolerance:
                            continue
                    row = static_row(dims, schedule, N, text_tokens)
                    reduction = 1.0 - row["Navg"] / N
                    if not meets(target, reduction, row["TFLOPs"]):
                        continue
                    gap = slack(target, reduction, row["TFLOPs"])
                    if gap > tolerance:
                        continue
                    out.append(Candidate(schedule, row["Navg"], reduction, row["TFLOPs"],
                                         heuristic_key(schedule, L, gap)))
    if not out:
        raise ValueError(f"no setting meets {target.describe()} within tolerance {tolerance} for L={L}, N={N} "
                         f"(Nc in {nc_values}, Np in {np_values}, Ls >= {min_ls}); widen the grid or the tolerance")
    return sorted(out, key=lambda c: c.key)


# ------------------------------------------------------------------ calibration

def pareto_front(points: Iterable[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Non-dominated ``(cost, accuracy, payload)`` points: no other point has cost <= and accuracy
    >= with one strictly better. Sorted by cost (accuracy then rises along the front)."""
    ordered = sorted(points, key=lambda p: (p[0], -p[1]))
    front: list[tuple[float, float, Any]] = []
    for point in ordered:
        if not front or point[1] > front[-1][1]:
            if front and point[0] == front[-1][0]:
                continue
            front.append(point)
    return front


def calibrate(candidates: Sequence[Candidate], base_overrides: Sequence[str], out_dir: str | Path, *,
              config_dir: str | Path, evaluate_fn: Callable[[Any], dict[str, Any]]) -> list[Candidate]:
    """Evaluate each candidate (``evaluate(cfg)`` of ``configs/eval.yaml`` composed with
    ``base_overrides``, the candidate's schedule and ``output_dir=<out_dir>/<label>``); fills
    ``candidate.metrics`` and returns the Pareto front (gIoU mean against measured TFLOPs).

    ``base_overrides`` must select a schedule node to merge into (e.g. ``+exp=demo``). ``evaluate_fn``:
    the evaluation to run (``evaluation.evaluate.evaluate``; given by the caller, so that this module
    needs nothing from the evaluation layer).
    """
    from hydra import compose, initialize_config_dir

    out_dir = Path(out_dir)
    for cand in candidates:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=[
                *base_overrides, f"schedule={schedule_override(cand.schedule)}",
                f"schedule.clustering={cand.schedule.clustering}", f"output_dir={out_dir / cand.label}"])
        if cfg.get("schedule") is None:
            raise ValueError(f"base overrides {list(base_overrides)} select no schedule to tune (add e.g. +exp=demo)")
        cand.metrics = evaluate_fn(cfg)["method"]
    points = [(c.metrics["summary"]["TFLOPs"], c.metrics["summary"]["gIoU_mean"], c) for c in candidates
              if c.metrics["summary"]["gIoU_mean"] is not None]
    return [p[2] for p in pareto_front(points)]


def table(candidates: Sequence[Candidate], num_tokens: int, front: Sequence[Candidate] = ()) -> str:
    """A markdown table of the candidates (static numbers; measured ones when calibrated)."""
    header = "| rank | Lc | Nc | Ls | Np | Navg | reduction % | TFLOPs |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    calibrated = any(c.metrics is not None for c in candidates)
    if calibrated:
        header += " gIoU mean | measured TFLOPs | Pareto |"
        rule += " --- | --- | --- |"
    lines = [header, rule]
    on_front = {id(c) for c in front}
    for rank, c in enumerate(candidates, 1):
        s = c.schedule
        line = (f"| {rank} | {s.Lc} | {s.Nc} | {s.Ls} | {s.Np} | {c.navg:.1f} | {100 * c.reduction:.1f} | "
                f"{c.tflops:.4g} |")
        if calibrated:
            m = (c.metrics or {}).get("summary", {})
            giou = m.get("gIoU_mean")
            line += (f" {'-' if giou is None else f'{100 * giou:.1f}'} | "
                     f"{'-' if m.get('TFLOPs') is None else format(m['TFLOPs'], '.4g')} | "
                     f"{'yes' if id(c) in on_front else ''} |")
        lines.append(line)
    return "\n".join(lines)
