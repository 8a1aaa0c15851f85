"""The shape of the package: no import cycles, small modules, layers that only look down, a light CLI import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every pipeline module `name` imports, wherever the import sits (top level, function, TYPE_CHECKING)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_there_are_no_import_cycles() -> None:
    """No module reaches itself through its imports, counting lazy and TYPE_CHECKING imports too."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_400_lines() -> None:
    """A module past 400 lines holds a second job; split it."""
    big = {name: n for name, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not big, big


def reaches(start: str) -> set[str]:
    """Every module imported, directly or not, by `start` (a module, or a package with all its modules)."""
    todo = [m for m in MODULES if m == start or m.startswith(start + ".")]
    seen: set[str] = set()
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


COMMANDS = ("pipeline.commands", "pipeline.cli")
ABOVE_RUN = ("pipeline.run", "pipeline.engines", "pipeline.analysis", "pipeline.commands", "pipeline.cli")


@pytest.mark.parametrize(
    ("lower", "banned"),
    [
        ("pipeline.results", {"pipeline"}),
        ("pipeline.errors", {"pipeline"}),
        ("pipeline.task", {"pipeline.input", "pipeline.sinks", "pipeline.api", "pipeline.ratelimit", *ABOVE_RUN}),
        ("pipeline.input", {"pipeline.sinks", "pipeline.api", "pipeline.ratelimit", *ABOVE_RUN}),
        ("pipeline.sinks", {"pipeline.api.client", "pipeline.ratelimit", *ABOVE_RUN}),
        ("pipeline.api", {"pipeline.sinks", *ABOVE_RUN}),
        ("pipeline.ratelimit", {"pipeline.api.client", *ABOVE_RUN}),
        ("pipeline.run", {"pipeline.cli", "pipeline.commands", "pipeline.simulator", "pipeline.engines"}),
        ("pipeline.engines", {"pipeline.cli", "pipeline.commands", "pipeline.simulator"}),
        ("pipeline.engines.batch.ledger", {"pipeline.engines.batch.api", "pipeline.api.client", "pipeline.run"}),
        (
            "pipeline.analysis",
            {
                "pipeline.api.client",
                "pipeline.engines.ray",
                "pipeline.engines.batch.api",
                "pipeline.cli",
                "pipeline.commands",
            },
        ),
        ("pipeline.commands", {"pipeline.cli"}),
    ],
)
def test_lower_layers_never_import_higher_ones(lower: str, banned: set[str]) -> None:
    """Results and errors import nothing of the pipeline; config, sinks and the client know nothing above them."""
    bad = {m for m in reaches(lower) for b in banned if m == b or m.startswith(b + ".")}
    assert not bad, f"{lower} reaches {sorted(bad)}"


def test_the_simulator_is_a_product_of_its_own() -> None:
    """Nothing in the pipeline imports the simulator, except the CLI's `simulate` command."""
    users = {m for m, targets in GRAPH.items() if any(t.startswith("pipeline.simulator") for t in targets)}
    assert {m for m in users if not m.startswith("pipeline.simulator")} == {"pipeline.commands.simulate"}


def test_importing_the_cli_loads_no_sdk_http_or_arrow() -> None:
    """`import pipeline.cli` (what --help and every command pay) loads neither openai, aiohttp, pyarrow nor tqdm."""
    probe = (
        "import sys, pipeline, pipeline.cli; "
        "print(sorted(m for m in ('openai', 'aiohttp', 'pyarrow', 'tqdm', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def typed_exports() -> dict[str, str]:
    """What type checkers see of `pipeline`: each name its TYPE_CHECKING block imports, with the module it is from."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    [block] = [node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    return {
        alias.name: node.module or "" for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }


def test_the_public_names_resolve() -> None:
    """Every name in pipeline.__all__ loads on first use as the very object type checkers are told it is."""
    import pipeline  # noqa: PLC0415 - the lazy loading is what is tested

    typed = typed_exports()
    assert sorted(pipeline.__all__) == sorted(typed), "__all__ and the TYPE_CHECKING imports disagree"
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is getattr(importlib.import_module(typed[name]), name), name
