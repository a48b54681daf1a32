"""Spatial clustering strategies (reimplementations, not their authors' code): ``kcenter`` and ``stratified``.

``kcenter`` (after EVTP-IV, WACV 2026, which reports LISA at 20% of the tokens close to full
accuracy; it has no public code, so the distance below is this project's choice): greedy
farthest-point selection (Gonzalez's 2-approximation of k-center) over the N tokens with

    d(i, j) = (1 - cos(f_i, f_j)) + weight * ||p_i - p_j||_2 / ||(rows - 1, cols - 1)||_2

where f are the CLIP patch features the projector receives (layer -2) and p the (row, col) grid
position. Why this distance: the cosine term is CLIP's own similarity, bounded in [0, 2] whatever
the feature scale of the checkpoint (the toy tower and ViT-L differ by orders of magnitude in
norm); the grid term is normalised by the grid diagonal so it lies in [0, 1] at every resolution
(224 and 336 give the same ``weight`` the same meaning). ``weight = 0`` is pure feature k-center
(it spends its budget on outlier patches), a large weight tends to a spatially even cover; the
toy sweep (docs/peers.md) varies it in {0, 0.25, 1, 4}. The first centre is the token farthest
(in cosine) from the mean feature, i.e. the most distinctive patch; each next one maximises the
distance to the nearest chosen centre (ties: the lowest index). Deterministic, per sample.

``stratified``: one token per cell of an even partition of the ``rows x cols`` grid into Nc
cells, position only (the features are not read; original position ids, as every clustering
strategy). The partition: ``a = clamp(round(sqrt(Nc * rows / cols)), ceil(Nc / cols), rows)`` row
bands with bounds ``floor(i * rows / a)``; the Nc cells are spread over the bands as evenly as
possible (the first ``Nc mod a`` bands get one more), and band b's ``k_b`` cells have column
bounds ``floor(j * cols / k_b)``. Every cell is non-empty (``a <= rows``, ``k_b <= cols``), so the
Nc tokens are distinct. ``pick: center`` takes each cell's centre token (the upper-left of the
central four on even sides), ``pick: random`` one token drawn uniformly per cell from a generator
seeded by (seed, sample id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csp.strategies.base import ClusteringInputs, ClusteringStrategy, register_strategy, sample_generator


def grid_positions(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``N x 2`` float64 (row, col) of each raster-order grid token."""
    rows, cols = grid
    idx = torch.arange(rows * cols, device=device)
    return torch.stack([idx // cols, idx % cols], dim=1).double()


def kcenter_distance(features: torch.Tensor, grid: tuple[int, int], weight: float) -> torch.Tensor:
    """``B x N x N`` float64 distances ``(1 - cos) + weight * grid distance / grid diagonal``."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    d = 1.0 - f @ f.transpose(1, 2)
    if weight:
        pos = grid_positions(grid, features.device)
        diag = math.hypot(max(grid[0] - 1, 1), max(grid[1] - 1, 1))
        d = d + weight * torch.cdist(pos, pos) / diag
    return d


@register_strategy("kcenter")
@dataclass
class KCenterStrategy(ClusteringStrategy):
    """Greedy farthest-point selection over CLIP features plus ``weight`` x normalised grid distance
    (module docstring)."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"kcenter.weight must be a number >= 0, got {self.weight!r}")

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        feats = inputs.features
        batch, n = feats.shape[:2]
        dist = kcenter_distance(feats, inputs.grid, float(self.weight))  # B x N x N
        f = torch.nn.functional.normalize(feats.double(), dim=-1)
        mean = torch.nn.functional.normalize(f.mean(dim=1, keepdim=True), dim=-1)
        first = (1.0 - (f * mean).sum(-1)).argmax(dim=1)  # B: most distinctive patch
        rows = torch.arange(batch, device=feats.device)
        chosen = torch.empty(batch, num_keep, dtype=torch.long, device=feats.device)
        chosen[:, 0] = first
        nearest = dist[rows, first]  # B x N: distance to the nearest chosen centre
        taken = torch.zeros(batch, n, dtype=torch.bool, device=feats.device)
        taken[rows, first] = True
        for i in range(1, num_keep):
            # argmax returns the first maximum: ties go to the lowest index
            nxt = nearest.masked_fill(taken, -1.0).argmax(dim=1)
            chosen[:, i] = nxt
            taken[rows, nxt] = True
            nearest = torch.minimum(nearest, dist[rows, nxt])
        return chosen.sort(dim=1).values


def stratified_cells(grid: tuple[int, int], num_keep: int) -> list[tuple[int, int, int, int]]:
    """The Nc cells ``(r0, r1, c0, c1)`` (half-open) of the even partition (module docstring), in
    raster order of their bands and columns."""
    rows, cols = grid
    if not 1 <= num_keep <= rows * cols:
        raise ValueError(f"stratified: Nc = {num_keep} must be in 1..{rows * cols}")
    bands = round(math.sqrt(num_keep * rows / cols))
    bands = min(max(bands, -(-num_keep // cols), 1), rows)
    cells = []
    for b in range(bands):
        r0, r1 = b * rows // bands, (b + 1) * rows // bands
        k = num_keep // bands + (1 if b < num_keep % bands else 0)
        for j in range(k):
            cells.append((r0, r1, j * cols // k, (j + 1) * cols // k))
    return cells


@register_strategy("stratified")
@dataclass
class StratifiedStrategy(ClusteringStrategy):
    """One token per cell of an even Nc-cell partition of the grid (module docstring)."""

    pick: str = "center"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pick not in ("center", "random"):
            raise ValueError(f"stratified.pick must be 'center' or 'random', got {self.pick!r}")

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        cols = inputs.grid[1]
        cells = stratified_cells(inputs.grid, num_keep)
        if self.pick == "center":
            row = torch.tensor([((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2 for r0, r1, c0, c1 in cells])
            out = row.sort().values.unsqueeze(0).expand(inputs.batch_size, -1)
        else:
            picked = []
            for sample_id in inputs.sample_ids:
                gen = sample_generator(self.seed, sample_id)
                idx = []
                for r0, r1, c0, c1 in cells:
                    u = int(torch.randint((r1 - r0) * (c1 - c0), (1,), generator=gen))
                    idx.append((r0 + u // (c1 - c0)) * cols + c0 + u % (c1 - c0))
                picked.append(torch.tensor(idx).sort().values)
            out = torch.stack(picked)
        return out.to(inputs.features.device)
