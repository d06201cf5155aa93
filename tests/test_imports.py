"""The import structure, read from the source with `ast` (nothing here is imported or run).

Layers, bottom to top:
    hashret/                     the shared core: imports no other package of ours
    train/  export/  serve/      the stages, side by side over hashret/: each imports hashret/ only
                                 (they meet through folders and manifest.json, never through code)
    benchmarks/  demo/           the top: they may import hashret/ and any stage, but not each other,
                                 and nothing below imports them

Every import counts for the layers, wherever it is written: at module level, inside a function
(a lazy import is still a dependency) or under `if TYPE_CHECKING:`. Two kinds of loop are refused:
  * between packages: the graph "package P imports something in package Q" has no cycle;
  * between modules at import time: following only the imports that run when a module is imported
    (module level, TYPE_CHECKING blocks left out), no module leads back to itself. An edge goes to
    the module an import names (`from a.b import c` -> a.b.c when that is a module, else a.b); the
    parent packages Python initialises on the way are not edges, so the usual "package __init__
    imports its submodules, which import a sibling" is not a loop, while a submodule importing a
    name from its own package's __init__ that imports it back is.
Names reached through importlib strings (hashret.cli's command table, the gallery's index-kind
discovery) are dispatch by name, not imports, and are not followed.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "hashret"
STAGES = ("train", "export", "serve")
TOP = ("benchmarks", "demo")
PACKAGES = (CORE, *STAGES, *TOP)

# What each package may import among ours (besides itself).
ALLOWED = {CORE: set(), **{s: {CORE} for s in STAGES}, **{t: {CORE, *STAGES} for t in TOP}}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the module of ours it names (see module docstring)
    line: int
    at_import: bool  # runs when the importer is imported

    @property
    def edge(self) -> str:
        return f"{self.importer} -> {self.target} (line {self.line})"


def modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted name -> file for every .py module under the packages (a package is its __init__)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _ours(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules; None for outside code."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


class _Walker(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: dict[str, Path]):
        self.module, self.known, self.found = module, known, []
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # inside a function body
        self.type_only = 0  # inside `if TYPE_CHECKING:`

    def _add(self, name: str, line: int) -> None:
        target = _ours(name, self.known)
        if target is not None and target != self.module:
            self.found.append(Import(self.module, target, line, self.depth == 0 and self.type_only == 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        t = node.test
        type_checking = (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
            isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")
        self.type_only += type_checking
        for child in node.body:
            self.visit(child)
        self.type_only -= type_checking
        self.visit(node.test)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)


def imports(root: Path = ROOT, packages=PACKAGES) -> list[Import]:
    known = modules(root, packages)
    out = []
    for name, f in known.items():
        w = _Walker(name, f.name == "__init__.py", known)
        w.visit(ast.parse(f.read_text(), filename=str(f)))
        out.extend(w.found)
    return out


def _pkg(module: str) -> str:
    return module.split(".")[0]


def layer_violations(found: list[Import]) -> list[str]:
    return sorted(i.edge for i in found
                  if _pkg(i.target) != _pkg(i.importer) and _pkg(i.target) not in ALLOWED[_pkg(i.importer)])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node, or with a self-edge (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_graph(found: list[Import]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for i in found:
        if _pkg(i.importer) != _pkg(i.target):
            g.setdefault(_pkg(i.importer), set()).add(_pkg(i.target))
    return g


def import_time_graph(found: list[Import]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for i in found:
        if i.at_import:
            g.setdefault(i.importer, set()).add(i.target)
    return g


@pytest.fixture(scope="module")
def found() -> list[Import]:
    return imports()


# ----------------------------------------------------------------------------- the tree's rules
def test_the_walk_sees_every_package_and_kind_of_import(found):
    """Guards the test itself: an empty or blind walk would pass every rule below."""
    assert {_pkg(m) for m in modules()} == set(PACKAGES)
    edges = {(i.importer, i.target, i.at_import) for i in found}
    assert ("demo.cli", "hashret.cliargs", True) in edges  # module level
    assert ("demo.steps", "train.train", False) in edges  # inside a function
    assert ("serve.service", "serve.gallery", False) in edges  # under `if TYPE_CHECKING:`
    assert len(found) > 100


def test_serve_imports_neither_train_nor_export(found):
    bad = sorted(i.edge for i in found if _pkg(i.importer) == "serve" and _pkg(i.target) in ("train", "export"))
    assert not bad, "serve/ must not import train/ or export/ (read their folders instead):\n" + "\n".join(bad)


def test_hashret_imports_no_stage(found):
    bad = sorted(i.edge for i in found if _pkg(i.importer) == CORE and _pkg(i.target) != CORE)
    assert not bad, "hashret/ is the shared core and imports no stage, benchmarks/ or demo/:\n" + "\n".join(bad)


def test_each_package_imports_only_the_layers_below(found):
    bad = layer_violations(found)
    assert not bad, ("stages import hashret/ only; benchmarks/ and demo/ import hashret/ and the stages but "
                     "not each other:\n" + "\n".join(bad))


def test_no_loop_between_packages(found):
    assert cycles(package_graph(found)) == []


def test_no_loop_between_modules_at_import_time(found):
    loops = cycles(import_time_graph(found))
    assert not loops, "modules that import each other when loaded:\n" + "\n".join(" <-> ".join(c) for c in loops)


# ----------------------------------------------------------------------------- the checks can fail
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


def test_checks_catch_bad_imports(tmp_path):
    root = _tree(tmp_path, {
        "hashret/codes.py": "import numpy\n",
        "hashret/cli.py": "def main():\n    from demo import cli\n",  # core importing the top, lazily
        "serve/server.py": "from train.losses import LOSSES\n",  # a stage importing a stage
        "train/losses.py": "from . import helpers\n",  # relative import, resolved to train.helpers
        "train/helpers.py": "from train.losses import LOSSES\n",  # ... which imports losses back
        "benchmarks/cli.py": "import demo.cli\n",  # the two top packages importing each other
        "demo/cli.py": "import serve.server\n",
    })
    found = imports(root)
    assert layer_violations(found) == [
        "benchmarks.cli -> demo.cli (line 1)",
        "hashret.cli -> demo.cli (line 2)",
        "serve.server -> train.losses (line 1)",
    ]
    assert cycles(import_time_graph(found)) == [["train.helpers", "train.losses"]]
    assert cycles(package_graph(found)) == []  # no package loop in this tree, only layer breaks


def test_checks_catch_loops_and_ignore_type_checking_and_lazy_imports(tmp_path):
    root = _tree(tmp_path, {
        "serve/gallery/__init__.py": "from serve.gallery.base import Gallery\nimport serve.gallery.hnsw\n",
        "serve/gallery/base.py": "class Gallery: ...\n",
        # a package __init__ importing a submodule that imports a sibling: not a loop
        "serve/gallery/flat.py": "from serve.gallery.base import Gallery\n",
        # a submodule taking a name from its own package's __init__, which imports it back: a loop
        "serve/gallery/hnsw.py": "from serve.gallery import Gallery\n",
        "serve/service.py": ("from typing import TYPE_CHECKING\n"
                             "if TYPE_CHECKING:\n    from serve.servicer import X\n"),
        "serve/servicer.py": "import serve.service\ndef f():\n    import serve.service\n",
        "train/a.py": "def f():\n    import export.b\n",  # lazy, but still a package edge
        "export/b.py": "import train.a\n",
    })
    found = imports(root)
    assert cycles(import_time_graph(found)) == [["serve.gallery", "serve.gallery.hnsw"]]
    assert cycles(package_graph(found)) == [["export", "train"]]
