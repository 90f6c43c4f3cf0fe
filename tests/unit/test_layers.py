"""The trainer's packages import one way only: each package from the layers below it.

The order is the one chatbot_trainer/__init__.py gives; every package's docstring says the
same. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "trainer-image" / "chatbot_trainer"
# Lowest first. A module may import its own layer and any layer before it.
LAYERS = [
    {"errors", "workspace", "params"},
    {"data"},
    {"model"},
    {"train"},
    {"evaluate", "export"},  # side by side: neither imports the other
    {"serve"},
    {"steps"},
    {"cli", "pipeline", "launch", "previous_results"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def unit_of(path: Path) -> str:
    """chatbot_trainer/data/packing.py → data; chatbot_trainer/cli.py → cli."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the module's own package
                continue
            module = node.module or ""
            if module == "chatbot_trainer":
                names = [f"chatbot_trainer.{a.name}" for a in node.names]
            else:
                names = [module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "chatbot_trainer" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if unit_of(p) != "__init__")


def test_every_module_belongs_to_a_layer():
    assert {unit_of(p) for p in MODULES} <= set(RANK), "a new package or top-level module needs a layer"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_only(path):
    unit = unit_of(path)
    upward = [
        f"line {line}: {unit} imports {target}"
        for target, line in sorted(imported_units(path))
        if target in RANK and (RANK[target] > RANK[unit] or {unit, target} == {"evaluate", "export"})
    ]
    assert not upward, f"{path.relative_to(ROOT)}: " + "; ".join(upward)


def test_package_docstrings_say_what_they_own():
    for package in sorted(p.parent for p in ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc, f"{package.name}/__init__.py has no docstring"
        if package.name != "steps":
            assert "import" in doc, f"{package.name}/__init__.py does not say what it may import"


OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "chatbot_operator"


def operator_imports() -> dict[str, set[str]]:
    """chatbot_operator module → the chatbot_operator modules it imports (lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(OPERATOR.glob("*.py")):
        found = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "chatbot_operator":
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatbot_operator."):
                found.add(node.module.split(".")[1])
    return graph


def test_operator_modules_import_without_cycles():
    graph = operator_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " → ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_planner_is_built_from_observation_diagnosis_and_status():
    """The planner's parts import one way: observe < diagnose < step_states < status_builder < planner."""
    order = ["observe", "diagnose", "step_states", "status_builder", "planner"]
    graph = operator_imports()
    for rank, module in enumerate(order):
        later = set(order[rank + 1:])
        assert not graph[module] & later, f"{module} imports {sorted(graph[module] & later)}"
    # pure: nothing that talks to the API server
    assert not graph["planner"] & {"kube", "reconciler", "handlers", "live_progress_poller"}
