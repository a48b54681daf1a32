"""The packages form layers, and imports only go down them; no module imports itself back in a circle.

Layers, lowest first (a package may import the ones listed for it, and nothing else of the project):

- ``csp`` (methods, plans, the runner, accounting) and ``datasets`` (data layouts): nothing;
- ``model`` (LISA, builders, the pipeline): ``csp``, ``datasets``;
- ``visualize``: ``csp``, ``datasets``, ``model``;
- ``runs`` (shared run infrastructure: model from its config node, launch, run directory, data
  preparation): ``csp``, ``datasets``, ``model``;
- ``evaluation``: the above;
- ``training``: the above and ``evaluation`` (validation runs evaluation's loop and metrics).

Entry points (``eval_ds.py``, ``train_ds.py``, ``app.py``, ``scripts/``, and the one-off toy experiments
in ``experiments/``) may import anything; nothing imports them (except ``app.py``, the web demo, which
uses ``scripts/chat.py``). Every import that runs counts, the ones
inside functions too (``if TYPE_CHECKING:`` imports, which never run, do not).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED: dict[str, set[str]] = {
    "csp": set(),
    "datasets": set(),
    "model": {"csp", "datasets"},
    "visualize": {"csp", "datasets", "model"},
    "runs": {"csp", "datasets", "model"},
    "evaluation": {"csp", "datasets", "model", "visualize", "runs"},
    "training": {"csp", "datasets", "model", "visualize", "runs", "evaluation"},
}
ENTRY = {"scripts", "experiments", "eval_ds", "train_ds", "app"}
PROJECT = set(ALLOWED) | ENTRY
#: The one entry point built on another: the web demo runs scripts/chat.py's model loading, preset and query.
ENTRY_USES = {("app", "scripts")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for package in [*ALLOWED, "scripts", "experiments"] for p in (REPO / package).rglob("*.py")]
    files += [REPO / "eval_ds.py", REPO / "train_ds.py", REPO / "app.py"]
    return {module_name(p): p for p in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for block in ast.walk(tree):  # annotations only: ``if TYPE_CHECKING:`` imports never run
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name.split(".")[0] in PROJECT}


@functools.cache
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for module, deps in graph().items():
        layer = module.split(".")[0]
        for dep in deps:
            target = dep.split(".")[0]
            if target == layer:
                continue
            into_entry = target in ENTRY and (layer, target) not in ENTRY_USES
            if into_entry or (layer in ALLOWED and target not in ALLOWED[layer]):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    edges = graph()
    # Tarjan's strongly connected components; a component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in edges.get(node, ()):
            if dep not in edges:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_layer_rules_know_every_package() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests"} <= set(ALLOWED) | {"scripts", "experiments"}, packages
