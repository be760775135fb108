"""The fork at another upstream release, built without moving this repository: what
``pip install ./releases/X`` (or ``git+...#subdirectory=releases/X``) runs.

``releases/<X>/`` holds ``release.json`` (the release file and the sha256 it must have, as
``upstream.json`` does for the pin) and a ``setup.py`` and ``pyproject.toml`` of a few lines that call
``setup_release``, all written by ``fork.py release add X``. The build:

- refuses, in one line, a release the series does not reach (a patch that conflicts there);
- fetches the release file with pip and checks its sha256 (``release.fetch``);
- computes the tree ``fork.py rebase X`` would lay down: the series replayed from the pin onto X
  (``rebase.replay``: each patch's variant for X where it has one, else the three-way merge and fuzz;
  patches upstream has by X left out), our own tracked modules, and the files ``materialize`` generates
  for a pin at X (the version module, the aliases);
- writes that tree into ``releases/<X>/tree/`` (git-ignored; renamed into place whole), checks it
  byte for byte, and packages exactly those files as ``diffusers`` ``X+flash.N``;
- declares X's own dependencies (its wheel's ``Requires-Dist``) plus ours (``OURS``, ``EXTRAS``).

The clone's own ``src/`` tree and ``upstream.json`` are never written. Each release has its own
directory so that its pip link differs (pip keys its wheel cache by the link, subdirectory included,
never by the environment): a wheel built for one release cannot be handed back for another.
"""
from __future__ import annotations

import configparser
import email.parser
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from . import fsutil, patchfile, rebase, release, tree, variants
from .release import PREFIX, ForkError

RELEASES = "releases"
DATA = "release.json"
TREE = "tree"  # releases/<X>/tree/src/diffusers/: the laid-down tree the wheel is made from (git-ignored)
FIELDS = ("version", "file", "sha256", "tag")
# Our modules' own requirements, added to every release's (pip takes the strictest bound where both name one).
OURS = ["huggingface-hub>=0.20", "safetensors>=0.3", "packaging", "requests", "tqdm", "numpy"]
# Our extras. Where the release has an extra of the same name, "torch" and "transformers" add to it; "test" and
# "dev" replace it (they install the project's suite, not upstream's: `fork.py test-upstream` installs that).
EXTRAS = {
    "torch": ["torch>=2.1", "accelerate>=0.20"],
    "transformers": ["transformers>=4.30"],
    "flash": ["flash-attn>=2.0"],
    "flash4": ["flash-attn-4>=4.0.0b36"],
    "test": ["pytest", "scipy", "transformers>=4.30", "accelerate>=0.20", "torch>=2.1"],
}
REPLACED_EXTRAS = ("test", "dev")
# Bounds the series lifts where the patch is applied: the release declared an older stack (Pillow<10,
# huggingface_hub 0.x), and with the patch it runs on today's. The release's specifiers for these are dropped
# (OURS keeps huggingface-hub>=0.20).
LIFTS = {"0001-hub-compat.patch": ("huggingface-hub", "pillow")}
SETUP_PY = '''\
# diffusers-flash at upstream diffusers {version}: `pip install ./releases/{version}` (written by
# `scripts/fork.py release add`; the build is scripts/forklib/build.py, which finds the repository above).
import sys
from pathlib import Path

ROOT = next((p for p in Path(__file__).resolve().parents if (p / "scripts" / "forklib" / "build.py").is_file()), None)
if ROOT is None:
    sys.exit("diffusers-flash: build this from a clone of the repository (pip install ./releases/{version})")
sys.path.insert(0, str(ROOT / "scripts"))

from forklib.build import setup_release  # noqa: E402

setup_release(__file__)
'''
PYPROJECT = '''\
# diffusers-flash at upstream diffusers {version}: see setup.py
[build-system]
requires = ["setuptools>=64", "wheel"]
build-backend = "setuptools.build_meta"
'''
_VERSION = re.compile(r"^\d+(\.\d+)+$")


# ---------------------------------------------------------------- the release directories
def release_dir(root: Path, version: str) -> Path:
    return Path(root) / RELEASES / version


def listed(root: Path) -> list:
    """The releases with a directory under releases/, in version order."""
    base = Path(root) / RELEASES
    found = [p.name for p in base.iterdir() if p.is_dir() and _VERSION.match(p.name)] if base.is_dir() else []
    return sorted(found, key=variants.vkey)


def load_release(root: Path, version: str) -> dict:
    """releases/<version>/release.json, checked like the pin, with the pin's fork release number."""
    if not _VERSION.match(version):
        raise ForkError(f"{version!r} is not a release version (e.g. 0.42.1)")
    path = release_dir(root, version) / DATA
    if not path.is_file():
        have = ", ".join(listed(root)) or "none"
        raise ForkError(f"no releases/{version}/{DATA}: the fork is built for the releases under releases/ ({have})")
    try:
        data = json.loads(fsutil.read_text(path, f"releases/{version}/{DATA}"))
    except json.JSONDecodeError as e:
        raise ForkError(f"releases/{version}/{DATA}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in FIELDS):
        raise ForkError(f"releases/{version}/{DATA}: needs the fields {', '.join(FIELDS)}")
    if data["version"] != version:
        raise ForkError(f"releases/{version}/{DATA} names {data['version']}, not {version}")
    if not fsutil.is_sha256(data["sha256"]):
        raise ForkError(f"releases/{version}/{DATA}: \"sha256\" {data['sha256']!r} is not a sha256: refusing a release "
                        "file that cannot be checked")
    pin = release.load_pin(root)
    return {**pin, "commit": None, **{k: data.get(k) for k in (*FIELDS, "commit")}}


def add(root: Path, versions: list, log=print) -> list:
    """Write releases/<X>/ for each release the series reaches (checked first, in memory); the release file's
    sha256 is the one the index publishes. Refuses the lot, writing nothing, if one is not reached."""
    root = Path(root)
    pins = []
    for text in versions:
        t = rebase.resolve(root, text, None, for_pin=True)
        pin = {**release.load_pin(root), **{k: t.get(k) for k in (*FIELDS, "commit")}}
        expected(root, pin)  # refuses a release the series does not reach
        pins.append(pin)
    for pin in pins:
        v = pin["version"]
        data = {k: pin[k] for k in FIELDS} | ({"commit": pin["commit"]} if pin.get("commit") else {})
        d = release_dir(root, v)
        for name, text in ((DATA, json.dumps(data, indent=2) + "\n"), ("setup.py", SETUP_PY.format(version=v)),
                           ("pyproject.toml", PYPROJECT.format(version=v))):
            fsutil.write_if_changed(d / name, text.encode())
        log(f"releases/{v}/: {pin['file']}, sha256 {pin['sha256'][:12]}...; "
            f"pip install ./releases/{v}")
    return [p["version"] for p in pins]


def problems(root: Path) -> list:
    """What is wrong with the release directories: each holds exactly what `release add` writes."""
    out = []
    for v in listed(root):
        d = release_dir(root, v)
        try:
            load_release(root, v)
        except ForkError as e:
            out.append(str(e))
            continue
        for name, text in (("setup.py", SETUP_PY), ("pyproject.toml", PYPROJECT)):
            p = d / name
            if not p.is_file() or fsutil.read_text(p) != text.format(version=v):
                out.append(f"releases/{v}/{name}: not what 'fork.py release add {v}' writes")
    return out


# ---------------------------------------------------------------- the tree
def expected(root: Path, pin: dict) -> dict:
    """The package ``rebase`` would lay down at ``pin`` (a pin-like dict for the target release), as
    ``src/diffusers/...`` -> text: the series replayed onto it, our tracked modules, the generated files.
    ForkError (one line) when the series does not reach the release."""
    root = Path(root)
    version = pin["version"]
    patches, old_states, old_pin = rebase.old_series(root)
    base = release.read_release(release.fetch(root, version, pin["file"], pin["sha256"], f"releases/{version}/{DATA}"))
    texts, results, stop = rebase.replay(patches, old_states, base, 0, old_pin["version"], version,
                                         found_variants=variants.load(root, [n for n, _ in patches]))
    if stop:
        res = results[stop[0]]
        files = ", ".join(c["path"][len(PREFIX):] for c in res["conflicts"]) or "it changes nothing there"
        raise ForkError(f"the series does not reach {version}: {res['name']} {res['status']} ({files}); "
                        f"'python scripts/fork.py rebase --check {version}' shows the rest")
    files, _ = tree.apply_series(base, [(n, patchfile.parse(texts[n], n)) for n, _ in patches if n in texts],
                                 strict=True)
    mine = ours(root)
    shadows = sorted(set(mine) & set(base))
    if shadows:
        raise ForkError(f"{version} has file(s) where we keep our own: {', '.join(shadows)}")
    gen = tree.generated(pin, files)
    return {**files, **mine, **{rel: gen[rel] for rel in gen if rel not in (tree.GITIGNORE, tree.MANIFEST)}}


def ours(root: Path) -> dict:
    """Our own files under src/diffusers (git-tracked; in a copy without git, those materialize did not lay
    down), as path -> text."""
    names = tree.tracked(root) or set(tree.ours(root))
    out = {}
    for rel in sorted(names):
        text = tree.read(root, rel)
        if text is not None and "__pycache__" not in rel and not rel.endswith(".pyc"):
            out[rel] = text
    return out


def write_tree(dest: Path, files: dict) -> None:
    """``files`` as the folder ``dest`` (``src/diffusers/...`` under it), whole: written beside it, renamed."""
    rebase.write_tree(dest, files)


def tree_problems(package_dir: Path, files: dict) -> list:
    """The byte check of a laid-down or installed package folder (``.../diffusers``) against ``files``
    (``src/diffusers/...`` -> text): every file there, byte for byte, and no other (compiled files aside)."""
    package_dir = Path(package_dir)
    want = {rel[len(PREFIX):]: text.encode("utf-8") for rel, text in files.items()}
    have = {p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"} if package_dir.is_dir() else set()
    out = [f"{rel}: missing" for rel in sorted(set(want) - have)]
    out += [f"{rel}: not part of the fork at this release" for rel in sorted(have - set(want))]
    out += [f"{rel}: differs from what rebase lays down" for rel in sorted(set(want) & have)
            if (package_dir / rel).read_bytes() != want[rel]]
    return out


# ---------------------------------------------------------------- the release's own metadata
def metadata(path: Path) -> tuple[str, str | None]:
    """(METADATA or PKG-INFO text, entry_points.txt text or None) of a release file (wheel or sdist)."""
    path = Path(path)
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            meta = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
            eps = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/entry_points\.txt", n)), None)
            if meta is None:
                raise ForkError(f"{path.name}: no .dist-info/METADATA")
            return z.read(meta).decode("utf-8"), z.read(eps).decode("utf-8") if eps else None
    with tarfile.open(path) as t:
        members = {m.name: m for m in t.getmembers() if m.isfile()}
        meta = next((n for n in members if re.fullmatch(r"[^/]+/PKG-INFO", n)), None)
        eps = next((n for n in members if re.fullmatch(r"[^/]+/(src/)?[^/]+\.egg-info/entry_points\.txt", n)), None)
        if meta is None:
            raise ForkError(f"{path.name}: no PKG-INFO")
        read = lambda n: t.extractfile(members[n]).read().decode("utf-8")  # noqa: E731
        return read(meta), read(eps) if eps else None


def _name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def requirements(meta: str, active: list) -> dict:
    """install_requires, extras_require and python_requires from the release's METADATA text, plus ours.
    ``active``: the names of the patches applied at the release (``LIFTS``)."""
    msg = email.parser.Parser().parsestr(meta, headersonly=True)
    lifted = {n for p, names in LIFTS.items() if p in active for n in names}
    base, extras = [], {}
    for line in msg.get_all("Requires-Dist") or []:
        req, _, marker = line.partition(";")
        m = re.search(r"""(?:\band\s+)?\bextra\s*==\s*["']([^"']+)["'](?:\s+and\b)?""", marker)
        extra = m.group(1) if m else None
        marker = (marker[:m.start()] + marker[m.end():] if m else marker).strip()
        req = req.strip()
        if _name(req) in lifted:
            if not extra and _name(req) in {_name(r) for r in OURS}:
                continue  # ours says it
            req = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?", req).group(0)
        req = req + (f"; {marker}" if marker else "")
        (extras.setdefault(extra, []) if extra else base).append(req)
    for name in REPLACED_EXTRAS:
        extras.pop(name, None)
    for name, reqs in EXTRAS.items():
        extras[name] = list(dict.fromkeys(extras.get(name, []) + reqs))
    extras["dev"] = sorted(set(extras["test"]))
    python = ">=3.10" + (f",{msg['Requires-Python'].strip()}" if msg["Requires-Python"] else "")
    return {"install_requires": list(dict.fromkeys(base + OURS)), "extras_require": extras,
            "python_requires": python}


def entry_points(text: str | None) -> dict:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str
    parser.read_string(text or "")
    return {s: [f"{k} = {v}" for k, v in parser.items(s)] for s in parser.sections()}


# ---------------------------------------------------------------- the build
def prepare(root: Path, version: str, dest: Path) -> dict:
    """Lay the fork at ``version`` into ``dest/src/diffusers`` and check it byte for byte; the setup()
    arguments for it (``package_dir`` aside: the caller's, relative to its setup.py)."""
    root = Path(root)
    pin = load_release(root, version)
    files = expected(root, pin)
    write_tree(dest, files)
    bad = tree_problems(Path(dest) / PREFIX, files)
    if bad:
        raise ForkError(f"the tree laid down in {dest} is not what rebase lays down: {'; '.join(bad[:5])}")
    path = release.fetch(root, version, pin["file"], pin["sha256"], f"releases/{version}/{DATA}")
    meta, eps = metadata(path)
    active = [n for n, p in variants.active(tree.load_patches(root), version)]
    pkgs = sorted({".".join(Path(rel).parent.parts[1:]) for rel in files})
    data = {}
    for rel in files:
        if not rel.endswith(".py"):
            folder = Path(rel).parent
            data.setdefault(".".join(folder.parts[1:]), []).append(Path(rel).name)
    return {
        "name": release.PACKAGE,
        "version": release.fork_version(pin),
        "description": f"Diffusers {version} with FlashAttention (diffusers-flash fork at upstream {version})",
        "license": "Apache 2.0",
        "packages": pkgs,
        "package_data": data,
        "include_package_data": False,
        "entry_points": entry_points(eps),
        **requirements(meta, active),
    }


def setup_release(setup_file: str) -> None:
    """What releases/<X>/setup.py runs: build the fork at X from the repository above it."""
    import shutil

    from setuptools import setup

    here = Path(setup_file).resolve().parent
    root = next(p for p in here.parents if (p / "scripts" / "forklib" / "build.py").is_file())
    version = here.name
    try:
        kwargs = prepare(root, version, here / TREE)
    except (ForkError, patchfile.PatchError) as e:
        sys.exit(f"diffusers-flash {version}: {e}")
    shutil.rmtree(here / "build", ignore_errors=True)  # setuptools' own build/lib: no file of an earlier build
    setup(package_dir={"": f"{TREE}/src"}, **kwargs)


# ---------------------------------------------------------------- the installed package
def installed(python: str) -> tuple[str, Path]:
    """(version, package folder) of the diffusers that ``python`` imports, as its metadata records it."""
    code = ("import importlib.metadata as m, json, pathlib; d = m.distribution('diffusers'); "
            "print(json.dumps([d.version, str(pathlib.Path(d.locate_file('diffusers')).resolve())]))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/")
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise ForkError(f"{python}: no installed diffusers ({last})")
    version, folder = json.loads(res.stdout)
    return version, Path(folder)


def verify_installed(root: Path, python: str) -> tuple[str, list]:
    """(the fork version installed in ``python``'s environment, problems): its files against what rebase lays
    down at that release, byte for byte."""
    version, folder = installed(python)
    m = re.fullmatch(r"(\d+(?:\.\d+)+)\+flash\.(\w+)", version)
    if not m:
        return version, [f"diffusers {version} is not a diffusers-flash build (X+flash.N)"]
    target = load_release(root, m.group(1))
    if release.fork_version(target) != version:
        return version, [f"installed {version}, but this checkout builds {release.fork_version(target)}"]
    return version, tree_problems(folder, expected(root, target))


# ---------------------------------------------------------------- command line
def add_parser(sub, root: Path) -> None:
    p = sub.add_parser("release", help="the fork at other upstream releases, one pip command each (releases/)",
                       description="add: write releases/X/ for releases the series reaches (pip install ./releases/X "
                                   "then builds the fork at X); list: the releases there; verify-installed: check "
                                   "the diffusers installed for a Python, byte for byte, against what rebase lays "
                                   "down at its release.")
    p.add_argument("action", choices=("add", "list", "verify-installed"))
    p.add_argument("versions", nargs="*", metavar="X", help="add: the releases (e.g. 0.42.1)")
    p.add_argument("--python", default=sys.executable, help="verify-installed: the interpreter (default: this one)")
    p.set_defaults(func=lambda args: dispatch(root, args))


def dispatch(root: Path, args) -> int:
    if args.action == "add":
        if not args.versions:
            raise ForkError("name the releases to add (e.g. 'release add 0.42.1')")
        add(root, args.versions)
        return 0
    if args.versions:
        raise ForkError(f"'release {args.action}' takes no release")
    if args.action == "list":
        bad = problems(root)
        print("\n".join(listed(root)) or "no release directories")
        for b in bad:
            print(f"  - {b}")
        return 1 if bad else 0
    version, bad = verify_installed(root, args.python)
    if bad:
        print(f"verify-installed: FAILED: diffusers {version} ({len(bad)} problem(s))")
        print("\n".join(f"  - {b}" for b in bad[:50]))
        return 1
    print(f"verify-installed: OK: diffusers {version} is exactly what rebase lays down at that release")
    return 0
