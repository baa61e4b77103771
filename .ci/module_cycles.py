#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a loop (issue 26's rule for Rust; Python's
is import-linter's, in python/pyproject.toml).

The unit is a crate's top-level module (`grpc`, `core`, `device`, ...) and, inside `core`, each
of its children (`core::models`, `core::pools`, ...): the layers a change has to respect. An
edge is any `crate::` or `super::` path outside comments and `#[cfg(test)]` code (inline, or
a test module's file: tests and their fixtures sit above what they test); a module's own
submodules are one unit with it. cargo-modules builds the same graph from rust-analyzer,
but its module-to-submodule edges make every `use super::` a cycle, and it takes longer to
build than the rest of CI's Rust.

    python3 .ci/module_cycles.py [CRATE_SRC_DIR ...]   (default: every crate of the workspace)
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::\w+)+)")
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;")
# Modules whose children are units of their own.
SPLIT = {"core"}


def module_of(src: Path, file: Path) -> list[str]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def unit(path: list[str]) -> str:
    depth = 2 if path and path[0] in SPLIT else 1
    return "::".join(path[:depth])


def test_modules(src: Path) -> set[Path]:
    """Files of modules declared `#[cfg(test)] mod name;`: tests and their fixtures sit above
    everything they test, so their imports are no edges of the shipped graph."""
    found = set()
    for file in src.rglob("*.rs"):
        here = file.parent if file.stem in ("mod", "lib", "main") else file.with_suffix("")
        for name in TEST_MOD.findall(file.read_text()):
            found |= {here / f"{name}.rs", *(here / name).rglob("*.rs")}
    return found


def graph(src: Path) -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    skip = test_modules(src)
    for file in sorted(src.rglob("*.rs")):
        if "bin" in file.relative_to(src).parts[:-1] or file in skip:
            continue  # binaries are their own crates; tests are above the graph
        here = module_of(src, file)
        # Test code inline is cut off at its attribute; a test module declared in a line is
        # skipped as a file of its own above.
        text = TEST_MOD.sub("", file.read_text()).split("#[cfg(test)]")[0]
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("//")[0]
            for kind, path in PATH.findall(line):
                segments = path.strip(":").split("::")
                if kind == "crate":
                    target = segments
                else:
                    # `super` is the parent of the module the file is (a mod.rs is its directory).
                    base = here[:-1]
                    while segments and segments[0] == "super":
                        base, segments = base[:-1], segments[1:]
                    target = base + segments
                a, b = unit(here), unit(target)
                if a and b and a != b:
                    edges[a][b].append(f"{file}:{number}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    dirs = [Path(a) for a in argv] or [root / "src", *sorted(root.glob("*/src"))]
    bad = 0
    for src in dirs:
        edges = graph(src)
        for component in cycles(edges):
            bad += 1
            print(f"{src}: modules import each other in a loop: {', '.join(component)}", file=sys.stderr)
            for a in component:
                for b in component:
                    if b in edges[a]:
                        print(f"  {a} -> {b}: {', '.join(edges[a][b][:3])}", file=sys.stderr)
    if not bad:
        print(f"no module cycles in {len(dirs)} crates")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
