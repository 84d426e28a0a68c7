"""The package's import graph: no cycle, no edge from a lower layer to a higher one, no import of an
enclosing package. Imports are read from the source (module level, inside functions and under
TYPE_CHECKING alike), so a lazy import cannot hide a backward edge.

Layers, lowest first; a module may import its own layer and the layers below it:
    base     errors, _version                 nothing of loractl
    io       io/                              files: safetensors, checkpoints, atomic output, JSON
    core     findings, lineage, info, adapter, origin, patterns
    formats  formats/                         every format at the edge, the registry
    bases    bases/                           bases a LoRA merges into: GGUF, single-file SD, checkpoints
    ops      ops/                             pure operations on adapters and checkpoints
    reports  stats, inspection, validation, consumer_rules, plots
    remote   remote/                          registries, push/pull
    train    train/, data_sources (train's datasets reader, torch-free for the CLI's early checks)
    cli      cli/, __main__
    api      loractl/__init__                 the lazy public API
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loractl"
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("loractl.errors", "loractl._version", "loractl.extras")),
    ("io", ("loractl.io",)),
    ("core", ("loractl.findings", "loractl.lineage", "loractl.info", "loractl.adapter", "loractl.origin",
              "loractl.patterns", "loractl.choices")),
    ("formats", ("loractl.formats",)),
    ("bases", ("loractl.bases",)),
    ("ops", ("loractl.ops",)),
    ("reports", ("loractl.stats", "loractl.inspection", "loractl.validation", "loractl.consumer_rules", "loractl.plots")),
    ("remote", ("loractl.remote",)),
    ("train", ("loractl.train", "loractl.data_sources")),
    ("cli", ("loractl.cli", "loractl.__main__")),
    ("api", ("loractl",)),
]  # fmt: skip


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return out


def _imports(name: str, path: Path, is_package: bool, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """The loractl modules `name` imports (`from pkg import mod` counts as `pkg.mod`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loractl"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                target = ".".join([*here, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "loractl":
                continue
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return found - {name}


def _layer(name: str) -> int:
    """The index of the most specific layer prefix that holds `name`."""
    best = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
            if name == p or name.startswith(p + ".")]  # fmt: skip
    assert best, f"{name} is in no layer: place it in LAYERS"
    return max(best)[1]


MODULES = _modules()
GRAPH = {name: _imports(name, path, pkg, MODULES) for name, (path, pkg) in MODULES.items()}


def test_the_graph_is_read() -> None:
    """A control: the reader finds known edges, relative and lazy ones included."""
    assert "loractl.io.safetensors_header" in GRAPH["loractl.io.checkpoint"]
    assert "loractl.formats.gguf.writer" in GRAPH["loractl.formats.gguf"]  # imported inside write()
    assert "loractl.ops.merge" in GRAPH["loractl.cli.merge_cmd"]
    assert len(GRAPH) > 90


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_edge_runs_to_a_higher_layer(name: str) -> None:
    up = {t for t in GRAPH[name] if _layer(t) > _layer(name)}
    assert not up, f"{name} ({LAYERS[_layer(name)][0]}) imports a higher layer: {sorted(up)}"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_imports_an_enclosing_package(name: str) -> None:
    enclosing = {t for t in GRAPH[name] if name.startswith(t + ".")}
    assert not enclosing, f"{name} imports its enclosing package {sorted(enclosing)} (import the module instead)"


def test_there_is_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])
