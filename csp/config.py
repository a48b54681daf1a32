"""One resolver from a composed config to a method: :func:`method_from_config`.

Every entry point (``eval_ds.py``, ``train_ds.py``, ``scripts/chat.py``, ``scripts/flops_table.py``,
``scripts/benchmark.py``) turns its config into a method here and nowhere else. A config has two
nodes that pick the method:

- ``method``: ``{name: <registered method>, ...its parameters}`` (``configs/method/<name>.yaml``);
- ``schedule``: LVLM_CSP's parameters (Lc, Nc, Ls, Np, clustering, clustering_kwargs), kept as a
  config group of its own because its presets (``configs/schedule``) are many. A schedule with
  ``method`` null means ``csp``; ``method=csp`` takes its parameters from the schedule (or from the
  method node itself).

Both nodes null: plain LISA (``MethodConfig.method`` is None). The result also carries what a run
records about the method (:meth:`MethodConfig.record`) and the key that identifies the method with
its parameters (:meth:`MethodConfig.key`; a fine-tuned mask decoder is tied to it).

Only this module knows that the ``schedule`` node belongs to ``csp``: generic code asks the
:class:`~csp.methods.base.Method` it gets back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from csp.methods import Method, build_method

#: The method whose parameters the ``schedule`` config node holds.
SCHEDULE_METHOD = "csp"


def plain_data(node: Any) -> Any:
    """A config node (an OmegaConf container or any mapping / list) -> plain dicts and lists, with
    interpolations resolved (reading a DictConfig's items resolves them)."""
    if node is None:
        return None
    if isinstance(node, Mapping):
        return {str(k): plain_data(v) for k, v in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        return [plain_data(v) for v in node]
    return node


@dataclass(frozen=True)
class MethodConfig:
    """What :func:`method_from_config` resolved.

    Attributes:
        name: the registered method name, or None (plain LISA).
        params: the method's parameters as configured (for ``csp``: the schedule mapping).
        method: the built method, or None (plain LISA).
    """

    name: str | None
    params: dict[str, Any] = field(default_factory=dict)
    method: Method | None = None

    @property
    def spec(self) -> dict[str, Any] | None:
        """``{name, ...params}`` (None: plain LISA): the method and its parameters in one mapping."""
        return None if self.name is None else {"name": self.name, **self.params}

    def key(self) -> str:
        """JSON identity of the method with its parameters ("null" for plain LISA)."""
        return json.dumps(self.spec, sort_keys=True)

    def record(self) -> dict[str, Any]:
        """What run manifests and metrics.json record: ``{"method": ..., "schedule": ...}``.

        The layout of the records written before methods other than CSP existed, kept so that
        earlier runs resume and earlier plots read: ``csp`` is ``{"method": "csp", "schedule":
        <its parameters>}``, another method ``{"method": {name, ...params}, "schedule": None}``.
        """
        if self.name is None:
            return {"method": None, "schedule": None}
        if self.name == SCHEDULE_METHOD:
            return {"method": SCHEDULE_METHOD, "schedule": dict(self.params)}
        return {"method": self.spec, "schedule": None}

    def describe(self) -> str:
        return "plain LISA" if self.method is None else self.method.describe()


PLAIN = MethodConfig(None)


def method_from_config(cfg: Mapping[str, Any], *, build: bool = True) -> MethodConfig:
    """The method a composed config selects (see the module docstring).

    ``cfg``: any mapping with optional ``method`` and ``schedule`` keys (a Hydra config, or a plain
    dict). ``build=False`` resolves the name and parameters without building the method.
    Errors name the conflicting settings: a schedule beside another method, CSP parameters in both
    nodes, ``method=csp`` without parameters, unknown names (listing the registered ones).
    """
    schedule = plain_data(cfg.get("schedule"))
    method = plain_data(cfg.get("method"))
    if method is None and schedule is None:
        return PLAIN
    if method is None or method.get("name") == SCHEDULE_METHOD:
        inline = {k: v for k, v in (method or {}).items() if k != "name"}
        if inline and schedule is not None:
            raise ValueError(f"method=csp has parameters {sorted(inline)} and a schedule is set too; give "
                             "CSP's (Lc, Nc, Ls, Np) in one place (schedule=<preset> or schedule.Lc=...)")
        params = schedule if schedule is not None else inline
        if not params:
            raise ValueError("method=csp needs a schedule: schedule=<configs/schedule preset>")
        name = SCHEDULE_METHOD
    else:
        if schedule is not None:
            raise ValueError(f"method={method.get('name')} but a CSP schedule is set too; schedule is "
                             "LVLM_CSP's config: set schedule=null with another method")
        if "name" not in method:
            raise ValueError(f"method config {method} has no 'name'")
        name, params = str(method["name"]), {k: v for k, v in method.items() if k != "name"}
    built = build_method({"name": name, **params}) if build else None
    return MethodConfig(name, params, built)
