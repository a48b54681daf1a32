"""The three-stage image-token schedule (Lc, Nc, Ls, Np) of LVLM_CSP.

Layers 0..Lc-1 see Nc clustered image tokens, layers Lc..Lc+Ls-1 see all N, and the remaining
Lp = L - Lc - Ls layers see the top-Np tokens ranked by the [SEG] query's attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


#: What may rank CSP's pruning stage (``StageSchedule.pruning``).
PRUNING_SCORERS = ("attention", "ivc_value")


class ScheduleError(ValueError):
    """An invalid (Lc, Nc, Ls, Np) schedule; raised before any model is loaded."""


@dataclass(frozen=True)
class StageSchedule:
    """One LVLM_CSP setting.

    Attributes:
        Lc: number of clustering layers (0 disables the clustering stage).
        Nc: image tokens kept by the clustering module.
        Ls: number of scattering layers (all N image tokens).
        Np: image tokens kept in the last Lp layers (Np = N disables pruning).
        clustering: registry name of the clustering strategy.
        clustering_kwargs: keyword arguments for that strategy (e.g. ``layer`` or ``weights``).
        pruning: what ranks the pruning stage's tokens: ``attention`` (the paper's eq. 8, the [SEG]
            rows' attention) or ``ivc_value`` (IVC-Prune's value-similarity foreground score,
            ``csp.scorers.IvcValue``: seeds and question rows of the prompt, docs/peers.md).
    """

    Lc: int
    Nc: int
    Ls: int
    Np: int
    clustering: str = "uniform"
    clustering_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    pruning: str = "attention"

    def __post_init__(self) -> None:
        if self.pruning not in PRUNING_SCORERS:
            raise ScheduleError(f"schedule.pruning must be one of {PRUNING_SCORERS}, got {self.pruning!r}")
        for name in ("Lc", "Nc", "Ls", "Np"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ScheduleError(f"schedule.{name} must be an integer, got {value!r}")
        if self.Lc < 0:
            raise ScheduleError(f"schedule.Lc must be >= 0, got {self.Lc}")
        if self.Ls < 0:
            raise ScheduleError(f"schedule.Ls must be >= 0, got {self.Ls}")
        if self.Nc < 1:
            raise ScheduleError(f"schedule.Nc must be >= 1, got {self.Nc}")
        if self.Np < 1:
            raise ScheduleError(f"schedule.Np must be >= 1, got {self.Np}")

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        """Check the schedule against a model with ``num_layers`` layers and N image tokens."""
        L, N = num_layers, num_image_tokens
        if self.Lc + self.Ls > L:
            raise ScheduleError(
                f"schedule Lc + Ls = {self.Lc} + {self.Ls} = {self.Lc + self.Ls} exceeds the "
                f"model's {L} decoder layers (need Lc + Ls <= L)"
            )
        if self.Nc > N:
            raise ScheduleError(f"schedule.Nc = {self.Nc} exceeds the N = {N} image tokens")
        if self.Np > N:
            raise ScheduleError(f"schedule.Np = {self.Np} exceeds the N = {N} image tokens")
        if self.prunes(L, N) and self.Lc + self.Ls == 0:
            raise ScheduleError(
                "schedule prunes (Np < N, Lp > 0) but Lc + Ls = 0: pruning ranks tokens by the "
                "[SEG] attention of the layer before it, so at least one layer must precede it"
            )

    def clusters(self, num_image_tokens: int) -> bool:
        """Whether a clustering stage exists (Lc > 0 and Nc < N)."""
        return self.Lc > 0 and self.Nc < num_image_tokens

    def prunes(self, num_layers: int, num_image_tokens: int) -> bool:
        """Whether a pruning stage exists (Np < N and Lp > 0)."""
        return self.Np < num_image_tokens and self.Lp(num_layers) > 0

    def Lp(self, num_layers: int) -> int:  # noqa: N802 - the paper's name
        return num_layers - self.Lc - self.Ls

    def image_tokens_per_layer(self, num_layers: int, num_image_tokens: int) -> list[int]:
        """Image tokens each decoder layer processes, as the schedule prescribes (length L).

        With Ls = 0 the pruning stage ranks the Nc clustered tokens, so it keeps min(Np, Nc).
        """
        self.validate(num_layers, num_image_tokens)
        L, N = num_layers, num_image_tokens
        clustered = min(self.Nc, N) if self.clusters(N) else N
        before_pruning = N if self.Ls > 0 else clustered
        after = min(self.Np, before_pruning) if self.prunes(L, N) else before_pruning
        return [clustered] * self.Lc + [N] * self.Ls + [after] * self.Lp(L)

    def describe(self) -> str:
        pruning = "" if self.pruning == "attention" else f", pruning={self.pruning}"
        return f"(Lc={self.Lc}, Nc={self.Nc}, Ls={self.Ls}, Np={self.Np}, {self.clustering}{pruning})"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> StageSchedule | None:
        """Build from a config mapping (Hydra ``schedule`` node); ``None`` means plain LISA."""
        if cfg is None:
            return None
        known = {"Lc", "Nc", "Ls", "Np", "clustering", "clustering_kwargs", "pruning"}
        unknown = set(cfg) - known
        if unknown:
            raise ScheduleError(f"unknown schedule keys {sorted(unknown)}; expected {sorted(known)}")
        missing = {"Lc", "Nc", "Ls", "Np"} - set(cfg)
        if missing:
            raise ScheduleError(f"schedule is missing keys {sorted(missing)}")
        kwargs = dict(cfg.get("clustering_kwargs") or {})
        return cls(
            Lc=cfg["Lc"], Nc=cfg["Nc"], Ls=cfg["Ls"], Np=cfg["Np"],
            clustering=str(cfg.get("clustering", "uniform")), clustering_kwargs=kwargs,
            pruning=str(cfg.get("pruning") or "attention"),
        )
