"""Token maps during evaluation: the first ``vis.num_samples`` samples of every split.

Which samples are drawn is fixed from the data alone (the first K samples of each split in the
loaded order), so a multi-process run draws the same ones as a single process: whichever rank
evaluates such a sample writes ``<run dir>/token_maps/<split>/<sample_id>.png``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csp.geometry import TokenGeometry
from datasets.base import ImageGroup
from visualize.token_maps import TokenMap, token_map


def first_samples(groups: Sequence[ImageGroup], num_samples: int) -> set[tuple[str, str]]:
    """(split, sample_id) of the first ``num_samples`` samples of each split, in ``groups`` order."""
    chosen: dict[str, list[str]] = {}
    for group in groups:
        for sample in group.samples:
            taken = chosen.setdefault(sample.split, [])
            if len(taken) < num_samples:
                taken.append(sample.sample_id)
    return {(split, sid) for split, ids in chosen.items() for sid in ids}


def safe_name(text: str) -> str:
    """A file-name-safe form of a split or sample id (``refcoco+|unc|val`` -> ``refcoco+_unc_val``)."""
    return re.sub(r"[^A-Za-z0-9+._-]", "_", text)


class TokenMapWriter:
    """Writes the token maps of the chosen samples of one evaluated setting."""

    def __init__(self, pipe: Any, targets: set[tuple[str, str]], out_dir: Path, *, max_side: int | None = 448):
        self.pipe = pipe
        self.targets = targets
        self.out_dir = out_dir / "token_maps"
        self.max_side = max_side

    def wants(self, outcome: Any) -> bool:
        record = outcome.record
        return outcome.kept is not None and (record["split"], record["sample_id"]) in self.targets

    def write(self, outcome: Any) -> tuple[Path, TokenMap]:
        """Draw and save ``outcome``'s token map; returns its path and the map."""
        record, image = outcome.record, outcome.image
        geometry = TokenGeometry.for_tower(self.pipe.model.vision_tower, image.height, image.width)
        tmap = token_map(image, geometry, outcome.kept, num_layers=self.pipe.dims.num_layers,
                         masks=None if outcome.pred is None else outcome.pred[None],
                         caption=f"{record['split']} {record['sample_id']}: {record['text']}",
                         max_side=self.max_side)
        path = self.out_dir / safe_name(record["split"]) / f"{safe_name(record['sample_id'])}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmap.save(str(path))
        return path, tmap
