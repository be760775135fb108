"""The pin and the upstream release it names: fetch with pip, check the sha256, read the files.

The pin (``upstream.json`` at the repository root) names the upstream version, the release file
on the package index with its sha256, and the git tag and commit of the same release.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from .fsutil import PREFIX, ForkError, atomic_write, check_path, is_sha256, read_text

__all__ = ["PREFIX", "ForkError"]  # re-exported: the rest of the tool imports them from here
PIN_FILE = "upstream.json"
PACKAGE = "diffusers"
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.(whl|tar\.gz|tgz)$")


def load_pin(root: Path) -> dict:
    """The pin, checked: a release version, a plain release file name and a well-formed sha256 (an empty
    or missing hash would turn the integrity check off, so it is refused before anything is written)."""
    path = Path(root) / PIN_FILE
    try:
        pin = json.loads(read_text(path, PIN_FILE))
    except FileNotFoundError:
        raise ForkError(f"no pin: {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ForkError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(pin, dict):
        raise ForkError(f"{path}: not a JSON object")
    missing = [k for k in ("version", "file", "sha256", "tag", "fork_release") if k not in pin]
    if missing:
        raise ForkError(f"{path}: missing field(s) {', '.join(missing)}")
    if not is_sha256(pin["sha256"]):
        raise ForkError(f"{path}: \"sha256\" is {pin['sha256']!r}, not the release file's sha256 (64 lowercase hex "
                        "digits); refusing to lay down a release file that cannot be checked")
    if not isinstance(pin["version"], str) or not _VERSION.match(pin["version"]):
        raise ForkError(f"{path}: \"version\" {pin['version']!r} is not a release version (e.g. 0.4.2)")
    if not isinstance(pin["file"], str) or not _FILE.match(pin["file"]):
        raise ForkError(f"{path}: \"file\" {pin['file']!r} is not a plain wheel or sdist file name")
    if not isinstance(pin["tag"], str) or not isinstance(pin["fork_release"], (int, str)):
        raise ForkError(f"{path}: \"tag\" must be a string and \"fork_release\" a number")
    return pin


def save_pin(root: Path, pin: dict) -> None:
    atomic_write(Path(root) / PIN_FILE, (json.dumps(pin, indent=2) + "\n").encode(), durable=True)


def fork_version(pin: dict) -> str:
    """PEP 440 local version: the upstream version plus our release number."""
    return f"{pin['version']}+flash.{pin['fork_release']}"


def describe(pin: dict) -> str:
    return f"upstream diffusers {pin['version']} ({pin['file']}, sha256 {pin['sha256'][:12]}..., tag {pin['tag']})"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir(root: Path) -> Path:
    return Path(os.environ.get("DIFFUSERS_FLASH_CACHE") or Path(root) / ".upstream")


def check_hash(path: Path, expected: str, against: str = "the pin") -> None:
    actual = sha256(path)
    if actual != expected:
        raise ForkError(
            f"release file {path} does not match {against}: expected sha256 {expected}, got {actual}; "
            "refusing to use it (delete it to fetch again, or fix the pin)"
        )


def fetch(root: Path, version: str, filename: str, expected: str | None, against: str = "the pin") -> Path:
    """The release file in the cache, fetched with pip when absent; checked against ``expected``, which must
    be a well-formed sha256 (without one there is nothing to check the file against: refused)."""
    if not is_sha256(expected):
        raise ForkError(f"{against} gives no well-formed sha256 for {filename} ({expected!r}): refusing to use a "
                        "release file that cannot be checked")
    if not isinstance(filename, str) or not _FILE.match(filename):
        raise ForkError(f"{filename!r} is not a plain wheel or sdist file name")
    cache = cache_dir(root)
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _download(version, filename, cache)
        if not path.exists():
            raise ForkError(f"downloaded {PACKAGE}=={version} but {filename} is not among the files")
    check_hash(path, expected, against)
    return path


def _download(version: str, filename: str, dest: Path) -> None:
    kind = ["--only-binary", ":all:"] if filename.endswith(".whl") else ["--no-binary", ":all:"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PIP_TARGET")}
    with tempfile.TemporaryDirectory() as tmp:
        if not filename.endswith(".whl") and _download_json_api(version, filename, Path(tmp)):
            _move_into(Path(tmp) / filename, dest)  # pip download would build the archive's metadata first
            return
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "-d", tmp,
               f"{PACKAGE}=={version}"]
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            ok = res.returncode == 0 and (Path(tmp) / filename).exists()
            err = res.stderr.strip().splitlines()[-1:] if res.returncode else []
        except OSError as e:
            ok, err = False, [str(e)]
        if not ok:  # an environment without pip (uv): the index's JSON API
            ok = _download_json_api(version, filename, Path(tmp))
        if not ok:
            raise ForkError(f"could not download {PACKAGE}=={version} ({filename}) with pip: "
                            f"{' '.join(err) or 'no such file'}")
        _move_into(Path(tmp) / filename, dest)


def _move_into(path: Path, dest: Path) -> None:
    partial = dest / f".{path.name}.partial"  # a copy across file systems is not atomic: rename when whole
    shutil.move(str(path), partial)
    os.replace(partial, dest / path.name)


def _index_base() -> str:
    """The index's JSON API base: PIP_INDEX_URL with its /simple dropped (a file:// base serves a local copy)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    return index[: -len("/simple")] if index.endswith("/simple") else index


@functools.lru_cache(maxsize=4)
def _index_json(base: str):
    """The index's JSON document for the package (``{base}/pypi/diffusers/json``), or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{base}/pypi/{PACKAGE}/json", timeout=60) as r:
            return json.load(r)
    except Exception:
        return None


def _index_file(version: str, filename: str) -> dict | None:
    doc = _index_json(_index_base()) or {}
    return next((f for f in doc.get("releases", {}).get(version, []) if f.get("filename") == filename), None)


def _download_json_api(version: str, filename: str, dest: Path) -> bool:
    try:
        with urllib.request.urlopen(_index_file(version, filename)["url"], timeout=120) as r, \
                open(dest / filename, "wb") as f:
            shutil.copyfileobj(r, f)
        return True
    except Exception:
        return False


def wheel_name(version: str) -> str:
    return f"{PACKAGE}-{version}-py3-none-any.whl"


def sdist_name(version: str) -> str:
    return f"{PACKAGE}-{version}.tar.gz"


def release_file(version: str) -> tuple[str, str]:
    """(file name, sha256) of the file to lay ``version`` down from, as the index publishes them: the
    pure-Python wheel, else the source archive (some releases, 0.20.2 among them, were published only as
    one; its ``src/diffusers/`` is the same package). Where the index has neither, a ForkError naming the
    nearest releases it does have files for (or saying it does not answer)."""
    doc = _index_json(_index_base())
    if doc is None:
        raise ForkError(f"the package index does not answer (offline?), so it publishes no sha256 for "
                        f"{PACKAGE} {version}; nothing to check the release file against")
    published = {f.get("filename"): f for f in doc.get("releases", {}).get(version, [])}
    for name in (wheel_name(version), sdist_name(version)):
        digest = (published.get(name) or {}).get("digests", {}).get("sha256")
        if is_sha256(digest):
            return name, digest
    near = nearest_with_wheel(doc, version)
    raise ForkError(f"the package index publishes no sha256 for a wheel or source archive of {PACKAGE} {version} "
                    f"(no such release{'; nearest with a wheel: ' + ', '.join(near) if near else ''})")


def nearest_with_wheel(doc: dict, version: str) -> list:
    """The releases with a pure-Python wheel just below and just above ``version`` in the index's document."""
    def key(v):
        return tuple(int(n) for n in re.findall(r"\d+", v))
    have = sorted((v for v, files in doc.get("releases", {}).items() if re.fullmatch(r"\d+\.\d+\.\d+", v)
                   and any(f.get("filename") == wheel_name(v) for f in files)), key=key)
    below = [v for v in have if key(v) < key(version)]
    above = [v for v in have if key(v) > key(version)]
    return below[-1:] + above[:1]


def index_sha256(version: str, filename: str) -> str | None:
    """The sha256 the index publishes for a release file (PyPI JSON API), or None (offline, or no such file)."""
    entry = _index_file(version, filename)
    return entry["digests"]["sha256"] if entry else None


def index_versions() -> list | None:
    """The versions the index lists files for, or None when it does not answer."""
    doc = _index_json(_index_base())
    return None if doc is None else [v for v, files in doc.get("releases", {}).items() if files]


def read_release(path: Path) -> dict:
    """The package's files in a release file (wheel or sdist), as ``src/diffusers/...`` -> text."""
    path = Path(path)
    files = {}
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.startswith(PACKAGE + "/") and not info.is_dir():
                    files["src/" + info.filename] = _decode(z.read(info), path.name, info.filename)
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as t:
            for m in t.getmembers():
                parts = m.name.split("/", 1)
                if m.isfile() and len(parts) == 2 and parts[1].startswith(PREFIX):
                    files[parts[1]] = _decode(t.extractfile(m).read(), path.name, m.name)
    else:
        raise ForkError(f"{path}: not a wheel or sdist")
    files = {k: v for k, v in files.items() if "__pycache__" not in k and not k.endswith((".pyc", ".ipynb"))}
    for k in files:
        check_path(k, PREFIX, f"{path.name}: file")
    if not files:
        raise ForkError(f"{path}: holds no {PREFIX} files")
    return files


def _decode(data: bytes, release: str, member: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ForkError(f"{release}: {member} is not UTF-8 text") from None


def read_git_tag(repo: str, tag: str) -> dict:
    """The package's files at ``tag`` of an upstream git clone (README files left out, as the releases do)."""
    try:
        names = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", tag, "--", PREFIX],
                               check=True, capture_output=True, text=True).stdout.splitlines()
    except subprocess.CalledProcessError as e:
        raise ForkError(f"{repo}: no tag {tag} ({e.stderr.strip()})") from None
    names = [n for n in names if Path(n).name != "README.md"]
    if not names:
        raise ForkError(f"{repo}: tag {tag} holds no {PREFIX} files")
    data = subprocess.run(["git", "-C", repo, "archive", "--format=tar", tag, "--", *names],
                          check=True, capture_output=True).stdout
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            if m.isfile():
                files[check_path(m.name, PREFIX, f"tag {tag}: file")] = _decode(t.extractfile(m).read(), tag, m.name)
    return files


def git_tags(repo: str) -> list:
    out = subprocess.run(["git", "-C", repo, "tag", "--list"], capture_output=True, text=True)
    if out.returncode:
        raise ForkError(f"{repo}: not a git repository ({out.stderr.strip()})")
    return out.stdout.split()


def git_commit(repo: str, tag: str) -> str:
    out = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
                         capture_output=True, text=True)
    if out.returncode:
        raise ForkError(f"{repo}: no tag {tag}")
    return out.stdout.strip()


def committed_commit(root: Path, release: dict) -> str | None:
    """The upstream commit that a pin committed in this project's history gives for the same release (same
    version, file, sha256 and tag), or None: a rebase from the index cannot ask git for the tag's commit,
    but a rebase back to a release pinned before finds it where that pin was committed."""
    log = subprocess.run(["git", "-C", str(root), "log", "--format=%H", "--", PIN_FILE],
                         capture_output=True, text=True)
    for rev in log.stdout.split() if log.returncode == 0 else []:
        shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{PIN_FILE}"], capture_output=True, text=True)
        try:
            old = json.loads(shown.stdout) if shown.returncode == 0 else None
        except json.JSONDecodeError:
            continue
        if (isinstance(old, dict) and all(old.get(k) == release.get(k) for k in ("version", "file", "sha256", "tag"))
                and isinstance(old.get("commit"), str) and re.fullmatch(r"[0-9a-f]{40}", old["commit"])):
            return old["commit"]
    return None


def pristine(root: Path, pin: dict | None = None) -> dict:
    pin = pin or load_pin(root)
    return read_release(fetch(root, pin["version"], pin["file"], pin["sha256"]))
