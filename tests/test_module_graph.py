"""The shape of our own package, src/diffusers/flash: no import circle (imports at module level and inside
functions alike, read with ast, nothing imported) and no module over MAX_LINES lines, but for the ones listed
in TOO_LONG with the reason."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "diffusers.flash"
MAX_LINES = 500
# module (path under src/diffusers/flash) -> why it may be longer for now; a new long module fails the test
TOO_LONG = {
    "fastpath/engine.py": "CUDA graphs, compile and the portable cache in one module: being split by what each does",
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__.py)."""
    base = ROOT / PACKAGE.replace(".", "/")
    found = {}
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b`: the module a.b where there is one, else a itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module: that module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (as a path back to its start) per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:  # a shortest path from the group's first module back to it, inside the group
        start, members = sorted(group)[0], set(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & members)
            if start in nxt:
                circles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return circles


def test_the_reader_sees_imports_at_module_and_function_level():
    graph = _graph()
    assert "diffusers.flash.attention.dispatch" in graph["diffusers.flash.cli"]  # inside a function
    assert "diffusers.flash.attention.base" in graph["diffusers.flash.attention.fa4"]  # at module level
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle_in_the_package():
    circles = _circles(_graph())
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_over_the_size_limit_but_the_listed_ones():
    base = ROOT / PACKAGE.replace(".", "/")
    sizes = {path.relative_to(base).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in base.rglob("*.py")}
    over = {p: n for p, n in sizes.items() if n > MAX_LINES and p not in TOO_LONG}
    assert not over, f"modules over {MAX_LINES} lines (split them, or list one in TOO_LONG with the reason): {over}"
    stale = sorted(p for p in TOO_LONG if sizes.get(p, 0) <= MAX_LINES)
    assert not stale, f"listed in TOO_LONG but no longer over {MAX_LINES} lines (remove them from the list): {stale}"
