"""The fork at another upstream release in one pip command (releases/X, scripts/forklib/build.py): installed
into a fresh virtual environment the way README documents it, checked byte for byte against what `rebase X`
lays down, run there through our dispatcher, uninstalled without a trace; pip's wheel cache never hands one
release's build back for another; a release the series does not reach is refused before anything is
installed. The builds fetch upstream's release files and pip's build tools: they need the package index."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forklib import build, patchfile, release, tree

ROOT = Path(__file__).resolve().parent.parent
PIN = release.load_pin(ROOT)
OTHER = "0.42.1"  # a release other than the pin: the newest on PyPI
GENERATE = r"""
import json
import numpy as np
import torch
import diffusers
from diffusers.flash import local_pipelines
from diffusers.flash.attention import dispatch

calls = {}
real = dispatch.attention


def counting(*args, **kwargs):
    name = kwargs.get("backend") or (args[4] if len(args) > 4 else None) or dispatch.current()
    calls[name] = calls.get(name, 0) + 1
    return real(*args, **kwargs)


dispatch.attention = counting
pipe = local_pipelines.stable_diffusion()
images = {}
for name in ("math", "auto"):
    with dispatch.attention_backend(name):
        out = pipe("a red square", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    images[name] = np.asarray(out.images[0])
print(json.dumps({"version": diffusers.__version__, "file": diffusers.__file__, "calls": calls,
                  "shape": list(images["math"].shape), "finite": bool(np.isfinite(images["math"]).all()),
                  "spread": float(images["math"].std()),
                  "max_diff": float(np.abs(images["math"] - images["auto"]).max())}))
"""


@pytest.fixture(scope="module")
def online():
    if release.index_versions() is None:
        pytest.skip("the package index does not answer: the build fetches upstream's release file and pip's build "
                    "tools from it")


@pytest.fixture
def venv(tmp_path):
    """A fresh virtual environment that sees the site-packages of this one after its own (torch and
    transformers come from there; a .pth of plain paths, so no editable install of this checkout comes
    along), with a pip cache of its own, and upstream's release files shared with this checkout's cache."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([str(path / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    outer = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(site) / "_outer_site_packages.pth").write_text("".join(p + "\n" for p in outer))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_TARGET")}
    env.update(PIP_CACHE_DIR=str(tmp_path / "pip-cache"), DIFFUSERS_FLASH_CACHE=str(release.cache_dir(ROOT)),
               PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", PATH=f"{path / 'bin'}:{env.get('PATH', '')}")
    return {"python": str(path / "bin" / "python"), "env": env, "path": path}


def pip(v, *args, check=True):
    res = subprocess.run([v["python"], "-m", "pip", *args], capture_output=True, text=True, env=v["env"], cwd="/")
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def py(v, code):
    res = subprocess.run([v["python"], "-c", code], capture_output=True, text=True, env=v["env"], cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def installed(v):
    """(version, package folder, files of the distribution's RECORD) in the venv."""
    return json.loads(py(v, "import importlib.metadata as m, json; d = m.distribution('diffusers'); "
                            "print(json.dumps([d.version, str(d.locate_file('diffusers')), "
                            "[str(d.locate_file(f)) for f in d.files]]))"))


def verify_installed(v):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fork.py"), "release", "verify-installed",
                           "--python", v["python"]], capture_output=True, text=True, env=v["env"])


# ------------------------------------------------------------------------------ the release directories
def test_every_release_directory_is_what_release_add_writes():
    assert OTHER in build.listed(ROOT) and PIN["version"] in build.listed(ROOT)
    assert build.problems(ROOT) == []


def test_a_release_directory_that_is_not_what_add_writes_is_named(tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(ROOT / "releases" / OTHER, copy / "releases" / OTHER)
    shutil.copy(ROOT / "upstream.json", copy / "upstream.json")
    (copy / "releases" / OTHER / "setup.py").write_text("import os\n")
    data = json.loads((copy / "releases" / OTHER / "release.json").read_text())
    (copy / "releases" / "0.40.0").mkdir()
    (copy / "releases" / "0.40.0" / "release.json").write_text(json.dumps({**data, "version": "0.40.0",
                                                                           "sha256": ""}))
    found = build.problems(copy)
    assert any(f"releases/{OTHER}/setup.py" in p for p in found), found
    assert any("releases/0.40.0/release.json" in p and "sha256" in p for p in found), found


def test_requirements_are_the_releases_own_plus_ours():
    meta = ("Metadata-Version: 2.1\nName: diffusers\nRequires-Python: >=3.8.0\n"
            "Requires-Dist: huggingface-hub (>=0.10.0)\nRequires-Dist: Pillow (<10.0)\nRequires-Dist: httpx<1.0.0\n"
            "Requires-Dist: importlib-metadata; python_version < \"3.8\"\n"
            "Requires-Dist: torch>=1.4; extra == 'torch'\nRequires-Dist: librosa; extra == \"test\"\n"
            "Requires-Dist: peft; (python_version >= \"3.9\") and extra == \"training\"\n\n")
    lifted = build.requirements(meta, ["0001-hub-compat.patch"])
    assert "httpx<1.0.0" in lifted["install_requires"]
    assert "Pillow" in lifted["install_requires"]  # the bound the compat patch lifts is gone; hub: ours
    assert [r for r in lifted["install_requires"] if r.startswith("huggingface")] == ["huggingface-hub>=0.20"]
    assert 'importlib-metadata; python_version < "3.8"' in lifted["install_requires"]
    assert set(build.OURS) <= set(lifted["install_requires"])
    assert lifted["extras_require"]["torch"] == ["torch>=1.4", *build.EXTRAS["torch"]]
    assert lifted["extras_require"]["test"] == build.EXTRAS["test"]  # ours, not upstream's suite
    assert lifted["extras_require"]["training"] == ['peft; (python_version >= "3.9")']
    assert lifted["python_requires"] == ">=3.10,>=3.8.0"
    kept = build.requirements(meta, [])  # where the compat patch is not applied: the release's bounds stand
    assert "Pillow (<10.0)" in kept["install_requires"] and "huggingface-hub (>=0.10.0)" in kept["install_requires"]


def test_the_fork_at_0_40_0_requires_what_0_40_0_requires(online):
    pin = build.load_release(ROOT, "0.40.0")
    meta, eps = build.metadata(release.fetch(ROOT, "0.40.0", pin["file"], pin["sha256"]))
    reqs = build.requirements(meta, [])
    assert "httpx<1.0.0" in reqs["install_requires"]
    assert "huggingface-hub<2.0,>=1.23.0" in reqs["install_requires"]
    assert build.entry_points(eps) == {"console_scripts": ["diffusers-cli = diffusers.commands.diffusers_cli:main"]}


# ------------------------------------------------------------------------------ refused before anything is installed
def _copy_of_this_checkout(dest: Path) -> Path:
    for rel in ("upstream.json", "PATCHES.md", "patches", "scripts", f"releases/{OTHER}"):
        src = ROOT / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("tree", "build", "__pycache__")) \
            if src.is_dir() else shutil.copy(src, dest / rel)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "src/diffusers"], capture_output=True, text=True)
    for rel in files.stdout.split():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "add", "-A"], check=True)
    return dest


def test_a_release_the_series_does_not_reach_is_refused_in_one_line_before_install(online, venv, tmp_path):
    """A series with a patch that creates a file 0.42.1 has itself: it applies on the pin, not on 0.42.1."""
    copy = _copy_of_this_checkout(tmp_path / "clone")
    name = "0099-test-unreached.patch"
    text = patchfile.render("Description: a file 0.42.1 has of its own\nApplies-To: 0.4.2\n",
                            [patchfile.diff_file("src/diffusers/models/attention_processor.py", None, "x = 1\n")])
    (copy / "patches" / name).write_text(text)
    with open(copy / "patches" / "series", "a") as f:
        f.write(name + "\n")
    before = pip(venv, "list", "--format=json").stdout
    res = pip(venv, "install", str(copy / "releases" / OTHER), check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    ours = [ln.strip(" │╰─>") for ln in out.splitlines() if f"diffusers-flash {OTHER}:" in ln]
    assert len(ours) == 1, out[-3000:]
    assert f"does not reach {OTHER}: {name}" in ours[0] and "attention_processor.py" in ours[0], ours
    assert pip(venv, "list", "--format=json").stdout == before  # nothing installed
    assert not (copy / "src" / "diffusers" / "models").exists()  # the clone's own src/ tree: never laid down


# ------------------------------------------------------------------------------ one command, a fresh venv
@pytest.mark.slow  # three builds of the fork: a few minutes on two cores
def test_the_fork_at_another_release_installs_runs_and_uninstalls(online, venv):
    before = {p: p.read_bytes() for p in (ROOT / "upstream.json", ROOT / "src" / "diffusers" / "__init__.py")
              if p.exists()}
    pip(venv, "install", str(ROOT / "releases" / OTHER))  # README's form, from a clone
    version, folder, files = installed(venv)
    assert version == f"{OTHER}+flash.{PIN['fork_release']}"
    assert Path(folder).resolve().is_relative_to(venv["path"].resolve())  # the venv's own site-packages
    assert {p: p.read_bytes() for p in before} == before  # the clone's pin and src/ tree are not rewritten

    res = verify_installed(venv)  # the byte check: what `rebase 0.42.1` lays down, our modules included
    assert res.returncode == 0 and "verify-installed: OK" in res.stdout, res.stdout + res.stderr

    out = json.loads(py(venv, GENERATE).strip().splitlines()[-1])  # a tiny image through our dispatcher
    assert out["version"] == version and out["file"].startswith(folder)
    assert out["calls"].get("math", 0) > 0 and out["calls"].get("auto", 0) > 0, out
    assert out["shape"] == [64, 64, 3] and out["finite"] and out["spread"] > 0, out
    assert out["max_diff"] < 1e-3, out  # math (the reference) and auto agree

    init = Path(folder) / "models" / "attention_processor.py"
    init.write_text(init.read_text() + "# edited\n")  # the byte check can fail
    res = verify_installed(venv)
    assert res.returncode == 1 and "models/attention_processor.py: differs" in res.stdout, res.stdout

    pip(venv, "uninstall", "-y", "diffusers")
    left = [f for f in files if Path(f).exists()]
    assert left == [] and not Path(folder).exists(), left[:10]


@pytest.mark.slow  # builds from a git clone: a few minutes on two cores
def test_the_wheel_cache_never_hands_back_another_releases_build(online, venv):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    committed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", "HEAD", "releases/"],
                               capture_output=True, text=True).stdout.split()
    if f"releases/{OTHER}" not in committed or f"releases/{PIN['version']}" not in committed:
        pytest.fail(f"releases/{OTHER} and releases/{PIN['version']} must be committed: this test installs "
                    "from the git commit, as `pip install git+...` does")

    def link(version):  # README's git form, at a commit: the form pip caches wheels for
        return f"diffusers @ git+file://localhost{ROOT}@{head}#subdirectory=releases/{version}"

    first = pip(venv, "install", "--no-deps", link(OTHER)).stdout
    again = pip(venv, "install", "--no-deps", "--force-reinstall", link(OTHER)).stdout
    assert "Building wheel for diffusers" in first and "Using cached diffusers" in again  # the cache is on
    other = pip(venv, "install", "--no-deps", link(PIN["version"])).stdout
    assert "Using cached" not in other and "Building wheel for diffusers" in other, other[-2000:]
    assert installed(venv)[0] == f"{PIN['version']}+flash.{PIN['fork_release']}"
    res = verify_installed(venv)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("version", ["0.5.1", OTHER])  # 0.5.1: fuzz and three-way; 0.42.1: variants
def test_the_build_is_what_rebase_lays_down(online, tmp_path, monkeypatch, version):
    """`fork.py rebase X` for real in a scratch clone: its laid-down tree, our modules and the generated
    version module are the files the build packages, byte for byte."""
    monkeypatch.setenv("DIFFUSERS_FLASH_CACHE", str(release.cache_dir(ROOT)))
    copy = _copy_of_this_checkout(tmp_path / "clone")
    subprocess.run(["git", "-C", str(copy), "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm",
                    "scratch"], check=True)
    res = subprocess.run([sys.executable, str(copy / "scripts" / "fork.py"), "rebase", version, "--no-tests"],
                         capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rebased = {p.relative_to(copy).as_posix(): p.read_text() for p in (copy / "src" / "diffusers").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    for generated in (tree.GITIGNORE, tree.MANIFEST):
        rebased.pop(generated)
    built = build.expected(ROOT, build.load_release(ROOT, version))
    assert sorted(built) == sorted(rebased)
    assert [rel for rel in built if built[rel] != rebased[rel]] == []


def test_the_pins_own_wheel_holds_every_file_the_fork_lays_down(online, tmp_path):
    """`pip install .` packages the pin's tree whole: upstream's non-Python files (0.4.2's
    utils/model_card_template.md) as well as its modules."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("diffusers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    laid = set(tree.manifest(ROOT)["files"])
    assert laid, "nothing laid down in this checkout"
    missing = sorted(rel for rel in laid if rel[len("src/"):] not in names)
    assert missing == []
