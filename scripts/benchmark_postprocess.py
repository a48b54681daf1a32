"""The training loss's mask post-processing: LISA's two ``F.interpolate`` calls against their separable
matrix form (model.sam.sam_postprocess_separable), forward + backward; prints JSON.

Per original size: median seconds over ``--repeats`` interleaved runs of each path on the same
``K x 1 x 256 x 256`` low-res logits (BCE + Dice against a random mask, as the loss), the speed-up
(interpolate / separable), and the largest difference of the logits and of their gradients.

    python -m scripts.benchmark_postprocess                       # toy (128 x 128) and COCO-like (480 x 640)
    python -m scripts.benchmark_postprocess --size 128x128 --masks 3 --repeats 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model.sam import sam_postprocess, sam_postprocess_separable, sam_resized_size
from model.training import dice_loss, sigmoid_ce_loss

ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 480x640") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be >= 1")
    return h, w


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(fn, low_res: torch.Tensor, resized: tuple[int, int], original: tuple[int, int], gt: torch.Tensor
             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of forward + backward, the logits and the gradient of the low-res logits."""
    x = low_res.detach().clone().requires_grad_(True)
    _sync(x.device)
    start = time.perf_counter()
    logits = fn(x, resized, original)
    k = gt.shape[0]
    loss = sigmoid_ce_loss(logits, gt, k) + dice_loss(logits, gt, k)
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - start, logits.detach(), x.grad


def measure(original: tuple[int, int], masks: int, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    low_res = (torch.randn(masks, 1, 256, 256, generator=gen) * 4).to(device)
    gt = (torch.rand(masks, *original, generator=gen) > 0.7).float().to(device)
    resized = sam_resized_size(original)
    paths = {"interpolate": sam_postprocess, "separable": sam_postprocess_separable}
    for fn in paths.values():  # warm-up (the separable path builds its matrices once per size)
        one_step(fn, low_res, resized, original, gt)
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for _ in range(repeats):  # interleaved, so that a busy machine slows both alike
        for name, fn in paths.items():
            seconds, logits, grad = one_step(fn, low_res, resized, original, gt)
            times[name].append(seconds)
            outputs[name] = (logits, grad)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "original_size": list(original), "resized_size": list(resized), "masks": masks, "repeats": repeats,
        "interpolate_median_s": med["interpolate"], "separable_median_s": med["separable"],
        "speedup": med["interpolate"] / med["separable"],
        "max_abs_logit_diff": float((outputs["interpolate"][0] - outputs["separable"][0]).abs().max()),
        "max_abs_grad_diff": float((outputs["interpolate"][1] - outputs["separable"][1]).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, action="append", default=None,
                        help="original image size HEIGHTxWIDTH (repeatable; default 128x128 and 480x640)")
    parser.add_argument("--masks", type=int, default=3, help="masks per image (LISA: up to 3 conversations)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.masks < 1 or args.repeats < 1:
        parser.error(f"--masks and --repeats must be >= 1, got {args.masks} and {args.repeats}")
    device = torch.device(args.device)
    sizes = args.size or [(128, 128), (480, 640)]
    report = {"device": str(device), "threads": torch.get_num_threads(), "unit": "seconds per forward + backward",
              "sizes": [measure(size, args.masks, args.repeats, device) for size in sizes]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
