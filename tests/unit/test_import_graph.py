"""The package import graph against docs/architecture.md ("Packages"): no cycle inside edge/ or connector/,
and no import the package table does not allow. The graph is read from the source with `ast` (nothing is
imported); imports under `TYPE_CHECKING` and inside functions count like any other."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
ACYCLIC = ("edge", "connector")  # packages whose modules must not import each other in a circle
EVERYTHING = "*"


def project_packages(root: Path = ROOT) -> list[str]:
    """Top-level folders of the project (tests/ is not shipped; tunnel_lab/ only links the folders under
    the one import name the distribution installs, docs/architecture.md "Import name")."""
    return sorted(p.name for p in root.iterdir()
                  if (p / "__init__.py").is_file() and p.name not in ("tests", "tunnel_lab"))


def module_files(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (`pkg/__init__.py` is `pkg`)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (`tunnel_lab.edge.proxy.proxy_request` -> `edge.proxy`:
    the graph names modules by their folders, the code imports them through the `tunnel_lab` package)."""
    name = name.removeprefix("tunnel_lab.")
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str, modules: dict[str, Path], *, is_package: bool = False
               ) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the source."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                # `from edge import pages` imports the module edge.pages; `from edge.x import f` edge.x
                target = _resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules)
                if target is not None:
                    yield target, node.lineno


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    modules = module_files(root, project_packages(root))
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        source = path.read_text()
        for target, line in imports_of(module, source, modules, is_package=path.name == "__init__.py"):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_table(text: str) -> dict[str, tuple[str, ...]]:
    """docs/architecture.md's package table: row prefix -> allowed module prefixes (`*`: everything).

    A row's first cell names packages (`edge/`) or modules (`lab/api.py`); the modules one row names
    may import each other.
    """
    section = text.split("\n## Packages\n", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        allowed = (EVERYTHING,) if cells[2] == "everything" else tuple(re.findall(r"`([\w.]+)`", cells[2]))
        names = [path.removesuffix("/").removesuffix(".py").replace("/", ".")
                 for path in re.findall(r"`([\w/.]+)`", cells[0])]
        for name in names:
            rules[name] = allowed + tuple(n for n in names if n != name and EVERYTHING not in allowed)
    return rules


def row_of(module: str, rules: dict[str, tuple[str, ...]]) -> str | None:
    """The most specific row a module belongs to."""
    inside = [prefix for prefix in rules if module == prefix or module.startswith(prefix + ".")]
    return max(inside, key=len, default=None)


def violations(graph: dict[str, dict[str, int]], rules: dict[str, tuple[str, ...]],
               files: dict[str, Path]) -> list[str]:
    """Every import that crosses rows without the table allowing it, as `file:line: a imports b`."""
    out = []
    for module, edges in sorted(graph.items()):
        row = row_of(module, rules)
        assert row is not None
        allowed = rules[row]
        for target, line in sorted(edges.items()):
            if EVERYTHING in allowed or row_of(target, rules) == row:
                continue
            if any(target == a or target.startswith(a + ".") for a in allowed):
                continue
            where = files[module].relative_to(ROOT)
            out.append(f"{where}:{line}: {module} imports {target} (the `{row}` row allows "
                       f"{', '.join(allowed) or 'no project module'})")
    return out


# ---- the project --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


@pytest.fixture(scope="module")
def rules() -> dict[str, tuple[str, ...]]:
    return package_table(ARCHITECTURE.read_text())


def test_every_package_has_a_row(rules):
    missing = [p for p in project_packages() if row_of(p, rules) is None]
    assert missing == [], "add a row to the package table in docs/architecture.md"


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycle_inside(graph, package):
    inside = {m: {t: line for t, line in edges.items() if t.split(".")[0] == package}
              for m, edges in graph.items() if m.split(".")[0] == package}
    assert len(inside) > 3  # the package was found and read
    assert cycles(inside) == []


def test_imports_follow_the_package_table(graph, rules):
    files = module_files(ROOT, project_packages())
    assert violations(graph, rules, files) == []


def test_the_table_says_what_the_components_may_import(rules):
    # The rules that keep components runnable alone: a change here must be a decision.
    assert rules["wire"] == ()
    assert rules["connector"] == ("wire", "transport")
    assert rules["lab.runner"] == (EVERYTHING,)


# ---- the checker itself -------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_finds_a_cycle_held_by_type_checking_and_function_imports(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from pkg import a\n",
    })
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.b": 3}
    assert graph["pkg.b"] == {"pkg.c": 2}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (root / "pkg/c.py").write_text("")
    assert cycles(import_graph(root)) == []


def test_relative_imports_resolve_from_the_package(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "from .sub import x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from ..y import name\nfrom . import z\n",
        "pkg/sub/z.py": "",
        "pkg/y.py": "",
    })
    graph = import_graph(root)
    assert graph["pkg"] == {"pkg.sub.x": 1}
    assert graph["pkg.sub.x"] == {"pkg.y": 1, "pkg.sub.z": 2}


def test_reports_an_import_the_table_forbids():
    rules = package_table("# x\n\n## Packages\n\n| Package | What | May import |\n|---|---|---|\n"
                          "| `wire/` | core | nothing |\n| `connector/` | c; never lab | `wire` |\n"
                          "| `lab/` | l | `wire` |\n| `lab/runner/` | r | everything |\n\n## Next\n")
    assert rules == {"wire": (), "connector": ("wire",), "lab": ("wire",), "lab.runner": (EVERYTHING,)}
    files = {m: ROOT / (m.replace(".", "/") + ".py") for m in
             ("connector.cli", "connector.flags", "lab.store", "lab.runner.engine", "wire.errors")}
    graph = {"connector.cli": {"connector.flags": 3, "wire.errors": 4, "lab.store": 9},
             "connector.flags": {}, "lab.store": {"wire.errors": 1}, "wire.errors": {},
             "lab.runner.engine": {"connector.cli": 2, "lab.store": 3}}
    assert violations(graph, rules, files) == [
        "connector/cli.py:9: connector.cli imports lab.store (the `connector` row allows wire)"]
    graph["wire.errors"] = {"lab.store": 5}
    assert violations(graph, rules, files)[-1] == (
        "wire/errors.py:5: wire.errors imports lab.store (the `wire` row allows no project module)")
