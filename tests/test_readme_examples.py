"""Every ```python example in README.md runs as written on the CPU, each in a fresh process (issue 33 item 5).
An example that needs the Hugging Face Hub or CUDA says so on its first line (`# needs: hub, cuda`) and is
skipped here with that reason; at least one example runs offline. Examples import only public names."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
NEEDS = re.compile(r"# needs: ([a-z, ]+)\n")
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def needs(code):
    m = NEEDS.match(code)
    return {w.strip() for w in m.group(1).split(",")} if m else set()


def test_readme_has_an_offline_example_and_marks_the_others():
    assert BLOCKS and any(not needs(code) for code in BLOCKS)
    for code in BLOCKS:
        if not needs(code):  # unmarked: must not reach for the Hub or a GPU
            assert "from_pretrained(" not in code and '"cuda"' not in code, code
        assert needs(code) <= {"hub", "cuda"}, code


def test_readme_examples_import_only_public_names():
    import diffusers
    import diffusers.flash

    public = {"diffusers": set(dir(diffusers)), "diffusers.flash": set(diffusers.flash.__all__) | {"local_pipelines"}}
    doc = diffusers.flash.__doc__
    assert "diffusers.flash.local_pipelines" in doc.split("Layout:")[0]  # listed as public API
    for code in BLOCKS:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("diffusers"):
                assert node.module in public, f"{node.module} is not a public module"
                assert {a.name for a in node.names} <= public[node.module], ast.unparse(node)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example-{k + 1}" for k in range(len(BLOCKS))])
def test_readme_example_runs_as_written(code, tmp_path):
    if needs(code):
        pytest.skip(f"the README marks this example as needing: {', '.join(sorted(needs(code)))}")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if "print(image.size)" in code:
        assert r.stdout.strip().splitlines()[-1].startswith("(64, 64)")
