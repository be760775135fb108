"""The shape of our own package, src/diffusers/flash: no import circle (imports at module level and inside
functions alike, read with ast, nothing imported) and no module over MAX_LINES lines, but for the ones listed
in TOO_LONG with the reason."""
from __future__ import annotations

import ast
import contextlib
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "diffusers.flash"
MAX_LINES = 500
# module (path under src/diffusers/flash) -> why it may be longer for now; a new long module fails the test
TOO_LONG: dict[str, str] = {}


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
    assert "diffusers.flash.attention.dispatch" in graph["diffusers.flash.cli_env"]  # inside a function
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


def test_every_name_the_patches_take_from_the_package_exists():
    """The patches (patches/ and patches/variants/) import our modules by path and call names on them: each
    path must import and each name must be there, whatever our modules are called inside the package."""
    patches = sorted((ROOT.parent / "patches").rglob("*.patch"))
    assert patches, "no patches found"
    missing, checked = set(), set()
    for patch in patches:
        added = [line[1:] for line in patch.read_text(encoding="utf-8").splitlines()
                 if line.startswith("+") and not line.startswith("+++")]
        bound = {}  # the name a patch binds -> the object it gets
        for line in added:
            m = re.match(r"\s*from \.+(flash(?:\.\w+)*) import ([\w, ]+?)\s*(?:#.*)?$", line)
            if not m:
                continue
            path = f"diffusers.{m.group(1)}"
            module = importlib.import_module(path)
            for part in m.group(2).split(","):
                name, _, alias = part.strip().partition(" as ")
                if not hasattr(module, name) and hasattr(module, "__path__"):
                    with contextlib.suppress(ImportError):
                        importlib.import_module(f"{module.__name__}.{name}")  # a submodule
                checked.add(f"{path}.{name}")
                if hasattr(module, name):
                    bound[alias or name] = getattr(module, name)
                else:
                    missing.add(f"{path}.{name}")
        for line in added:
            for alias, attr in re.findall(r"\b(\w+)\.(\w+)\s*\(", line):
                if alias in bound:
                    checked.add(f"{alias}.{attr}")
                    if not hasattr(bound[alias], attr):
                        missing.add(f"{patch.name}: {alias}.{attr}")
    assert not missing, f"names the patches use that the package lacks: {sorted(missing)}"
    assert {"diffusers.flash.attention.hooks", "flash_hooks.bmm_attention", "attention_dispatch.cross_attention",
            "diffusers.flash.mixins.PipelineMixin", "diffusers.flash.cli.attention_env_info"} <= checked, checked


def test_type_hints_are_checked_in_the_flash_package_only():
    """pyproject.toml has ruff check annotations (ANN) in src/diffusers/flash/ (typing.Any allowed: ANN401 off)
    and nowhere else."""
    import shutil
    import subprocess

    import pytest

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    code = "def scaled(x, factor):\n    return x * factor\n"
    opaque = "from typing import Any\n\n\ndef scaled(x: Any, factor: float) -> Any:\n    return x * factor\n"

    def codes(path: str, source: str = code) -> str:
        done = subprocess.run([ruff, "check", "--output-format", "concise", "--stdin-filename", path, "-"],
                              input=source, capture_output=True, text=True, cwd=ROOT.parent)
        return done.stdout

    for path in ("src/diffusers/flash/attention/example.py", "src/diffusers/flash/fastpath/example.py",
                 "src/diffusers/flash/loading/example.py", "src/diffusers/flash/example.py"):
        assert "ANN001" in codes(path), path
        assert "ANN201" in codes(path), path
        assert "ANN" not in codes(path, opaque), path
    for path in ("src/diffusers/models/example.py", "scripts/forklib/example.py", "tests/example.py",
                 "examples/example.py", "bench/example.py"):
        assert "ANN" not in codes(path), path
