"""Where the rebase takes an upstream release from: the wheel, else the source archive (some releases,
0.20.2 among them, were published only as one), each checked against the sha256 the index publishes.
Offline: a fake index served from a file:// URL, tiny release files made here."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from forklib import release, tree

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("fork_cli_sources", SCRIPTS / "fork.py")
fork = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fork)

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
PATCHED = "from .flash.ours import f; x5 = f(5)\n"


def a_py(version: str, edit: bool = False) -> str:
    lines = [f"x{i} = {i}\n" for i in range(1, 11)]
    if edit:
        lines[4] = PATCHED
    return f"# diffusers {version}\n\n\n\n" + "".join(lines)


def files_of(version: str) -> dict:
    return {"__init__.py": f"__version__ = '{version}'\n", "a.py": a_py(version)}


def wheel(path: Path, version: str) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for rel, text in files_of(version).items():
            z.writestr(f"diffusers/{rel}", text)
        z.writestr(f"diffusers-{version}.dist-info/METADATA", f"Name: diffusers\nVersion: {version}\n")


def sdist(path: Path, version: str, extra: str = "") -> None:
    """A source archive laid out as upstream's: diffusers-V/setup.py, diffusers-V/src/diffusers/..."""
    members = {"setup.py": "raise SystemExit('not built here')\n", "PKG-INFO": f"Version: {version}\n",
               **{f"src/diffusers/{rel}": text + (extra if rel == "a.py" else "")
                  for rel, text in files_of(version).items()}}
    with tarfile.open(path, "w:gz") as t:
        for rel, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"diffusers-{version}/{rel}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git(cwd, *args):
    return subprocess.run([*GIT, "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def env(tmp_path, monkeypatch):
    """1.0.0 as a wheel, 1.1.0 only as a source archive, 1.2.0 listed with neither (an egg only), 1.3.0 a
    wheel; a project pinned to 1.0.0 with one patch."""
    cache, index, root = tmp_path / "cache", tmp_path / "index", tmp_path / "project"
    cache.mkdir()
    wheel(cache / "diffusers-1.0.0-py3-none-any.whl", "1.0.0")
    sdist(cache / "diffusers-1.1.0.tar.gz", "1.1.0")
    wheel(cache / "diffusers-1.3.0-py3-none-any.whl", "1.3.0")
    published = {v: [{"filename": p.name, "digests": {"sha256": sha(p)}, "url": "file:///nowhere"}]
                 for v, p in (("1.0.0", cache / "diffusers-1.0.0-py3-none-any.whl"),
                              ("1.1.0", cache / "diffusers-1.1.0.tar.gz"),
                              ("1.3.0", cache / "diffusers-1.3.0-py3-none-any.whl"))}
    published["1.2.0"] = [{"filename": "diffusers-1.2.0-py3.11.egg", "digests": {"sha256": "0" * 64},
                           "url": "file:///nowhere"}]
    (index / "pypi" / "diffusers").mkdir(parents=True)
    (index / "pypi" / "diffusers" / "json").write_text(json.dumps({"releases": published}))
    monkeypatch.setenv("DIFFUSERS_FLASH_CACHE", str(cache))
    monkeypatch.setenv("PIP_INDEX_URL", (index / "simple").as_uri())
    release._index_json.cache_clear()

    root.mkdir()
    git(root, "init", "-q")
    release.save_pin(root, {"package": "diffusers", "version": "1.0.0", "file": "diffusers-1.0.0-py3-none-any.whl",
                            "sha256": published["1.0.0"][0]["digests"]["sha256"], "tag": "v1.0.0",
                            "fork_release": 1})
    (root / "patches").mkdir()
    (root / "patches" / "series").write_text("")
    (root / ".gitignore").write_text("/.rebase/\n__pycache__/\n")
    tree.write(root, "src/diffusers/flash/ours.py", "def f(x):\n    return x\n")
    git(root, "add", "-A")
    tree.materialize(root, log=lambda m: None)
    tree.write(root, "src/diffusers/a.py", a_py("1.0.0", edit=True))
    tree.refresh(root, new_patch="0001-ours-in-a.patch", log=lambda m: None)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project on 1.0.0")
    assert tree.verify(root) == []
    yield {"root": root, "cache": cache, "published": published}
    release._index_json.cache_clear()


def rebase(env, *args) -> int:
    return fork.main(["rebase", "--root", str(env["root"]), "--no-tests", *args])


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".rebase", "__pycache__"} & set(p.relative_to(root).parts)}


def test_a_release_published_only_as_a_source_archive_is_served_from_it(env, capsys):
    root = env["root"]
    before = snapshot(root)
    assert rebase(env, "1.1.0") == 0, capsys.readouterr().err
    pin = release.load_pin(root)
    assert pin["file"] == "diffusers-1.1.0.tar.gz"
    assert pin["sha256"] == env["published"]["1.1.0"][0]["digests"]["sha256"]  # the index's, recorded in the pin
    assert (root / "src/diffusers/a.py").read_text() == a_py("1.1.0", edit=True)
    assert (root / "src/diffusers/__init__.py").read_text() == "__version__ = '1.1.0'\n"
    assert tree.verify(root) == []  # verify re-reads the archive, hash-checked against the pin
    git(root, "add", "-A")
    git(root, "commit", "-qm", "on 1.1.0")
    assert rebase(env, "1.0.0") == 0
    assert snapshot(root) == before  # and back, byte for byte


def test_check_reads_a_source_archive_too(env, capsys):
    assert fork.main(["rebase", "--root", str(env["root"]), "--check", "--no-import", "1.1.0"]) == 0
    out = capsys.readouterr().out
    assert "| 1.1.0 | clean |" in out or "| 1.1.0 | offsets |" in out, out


def test_a_tampered_source_archive_is_refused(env, capsys):
    root = env["root"]
    sdist(env["cache"] / "diffusers-1.1.0.tar.gz", "1.1.0", extra="import os; os.system('echo pwned')\n")
    before = snapshot(root)
    assert rebase(env, "1.1.0") == 2
    err = capsys.readouterr().err
    assert "diffusers-1.1.0.tar.gz" in err and "does not match" in err
    assert env["published"]["1.1.0"][0]["digests"]["sha256"] in err
    assert snapshot(root) == before and not (root / ".rebase" / "state.json").exists()
    with pytest.raises(release.ForkError, match="does not match"):
        release.fetch(root, "1.1.0", "diffusers-1.1.0.tar.gz", env["published"]["1.1.0"][0]["digests"]["sha256"])


def test_a_release_with_neither_file_names_the_nearest_with_a_wheel(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.2.0") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no sha256 for a wheel or source archive of diffusers 1.2.0" in err
    assert "nearest with a wheel: 1.0.0, 1.3.0" in err
    assert snapshot(env["root"]) == before


def test_the_wheel_is_preferred_where_both_are_published(env):
    env["published"]["1.3.0"].append({"filename": "diffusers-1.3.0.tar.gz", "digests": {"sha256": "1" * 64},
                                      "url": "file:///nowhere"})
    index = Path(release._index_base().removeprefix("file://")) / "pypi" / "diffusers" / "json"
    index.write_text(json.dumps({"releases": env["published"]}))
    release._index_json.cache_clear()
    assert release.release_file("1.3.0") == ("diffusers-1.3.0-py3-none-any.whl",
                                             env["published"]["1.3.0"][0]["digests"]["sha256"])
    assert release.release_file("1.1.0")[0] == "diffusers-1.1.0.tar.gz"
