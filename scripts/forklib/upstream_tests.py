"""fork.py test-upstream: run upstream Diffusers' own test suite, unmodified, against the installed fork.

Upstream's ``tests/`` and the repo-root fixtures they load by relative path are taken from a git
clone of upstream at a tag (``git archive``), laid into the git-ignored ``upstream-tests/<tag>/diffusers/``
and run there with pytest, in a subprocess of this interpreter, offline (``HF_HUB_OFFLINE=1``).
Our plugin (``forklib.upstream_plugin``) does what the fork needs around upstream's files and
reports tests that need the Hugging Face Hub as skipped, naming the repo.

Before the run, what the tag's ``setup.py`` lists in its test extra (``extras["test"]`` or
``extras["testing"]``) and is not installed is installed with pip into this interpreter's environment,
every installed distribution held at its version (``--no-install``: refuse instead, naming the pip
command). Upstream's repository-maintenance tests (``EXCLUDED``) are left out, each with its reason
in the report.

The repository given must be trusted: its ``conftest.py`` and tests run in this interpreter with the
user's rights, and its test extra is pip-installed. A URL gets a bare cache of its own
(``upstream-git-<sha256 of the URL>``), and its tag is checked against the repository on every run
(``git ls-remote``), fetched again where it moved.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .release import ForkError, cache_dir, load_pin

FIXTURES = ("tests", "hf-internal-testing")  # what upstream's tests need, relative to upstream's root
REQUIRED = "tests"
PLUGIN = "forklib.upstream_plugin"
OUT_DIR = "upstream-tests"
INI = "[pytest]\n# written by fork.py test-upstream: upstream's tests/ run with its own conftest.py only\n"
# upstream tests left out of every run: folder (relative to upstream's root) -> why
EXCLUDED = {
    "tests/repo_utils": "upstream's repository-maintenance tests: they run upstream's utils/ scripts (not laid out) "
                        "and need black; they test upstream's repository, not the library",
}
TEST_EXTRAS = ("test", "testing")
NOT_INSTALLED_ENV = "DIFFUSERS_FLASH_NOT_INSTALLED"  # read by upstream_plugin (the same name there)


def add_parser(subparsers, root: Path):
    p = subparsers.add_parser(
        "test-upstream", help="run upstream's own test suite against the installed fork",
        description="Take upstream's tests/ (and the fixtures they use) at TAG from a git clone of upstream, "
                    "lay them into upstream-tests/TAG/diffusers/ and run them with pytest against the installed fork, "
                    "offline. Tests that need the Hugging Face Hub are skipped, naming the repo; any other "
                    "failure is a failure (exit 1). Arguments after -- go to pytest. "
                    "Use only a repository you trust: its conftest.py and test code run here with your rights, and "
                    "the packages its setup.py lists in its test extra are pip-installed. A URL is fetched into a "
                    "cache of its own, and the tag is checked against the repository on every run.")
    p.add_argument("--upstream-repo", metavar="URL_OR_PATH",
                   help="a git clone or bare mirror of upstream (local path), or a URL to clone shallow into "
                        "the cache (default: the pin's repo); it must be a repository you trust (its code runs)")
    p.add_argument("--tag", help="upstream tag whose tests to run (default: the pin's tag)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms, warn_only; cuDNN "
                        "deterministic; CUBLAS_WORKSPACE_CONFIG): tells a nondeterministic GPU kernel from a bug")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install what the tag's test extra needs and is missing: refuse instead")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="passed on to pytest, e.g. -- -k unet -x")
    p.set_defaults(func=lambda args: run(root, args.upstream_repo, args.tag, _strip_dashes(args.pytest_args),
                                         deterministic=args.deterministic, install=not args.no_install))
    return p


def _strip_dashes(extra: list) -> list:
    return extra[1:] if extra[:1] == ["--"] else extra  # argparse keeps the "--" on some Pythons


# ---------------------------------------------------------------- getting upstream's tests
def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise ForkError("git is not installed; test-upstream reads upstream's tests with git") from None
    except subprocess.CalledProcessError as e:
        raise ForkError(f"git {' '.join(args)} failed: {(e.stderr or '').strip()}") from None


def _is_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def _has_tag(repo: str, tag: str) -> bool:
    return subprocess.run(["git", "-C", repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}"],
                          capture_output=True).returncode == 0


def _tag_commit(repo: str, tag: str) -> str | None:
    r = subprocess.run(["git", "-C", repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def remote_tag_commit(url: str, tag: str) -> tuple[bool, str | None]:
    """(reached, the commit ``tag`` names in the repository at ``url``, None where it has no such tag)."""
    try:
        r = subprocess.run(["git", "ls-remote", "--tags", url, f"refs/tags/{tag}", f"refs/tags/{tag}^{{}}"],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    except (OSError, subprocess.TimeoutExpired):
        return False, None
    if r.returncode != 0:
        return False, None
    refs = dict(reversed(line.split("\t", 1)) for line in r.stdout.splitlines() if "\t" in line)
    return True, refs.get(f"refs/tags/{tag}^{{}}") or refs.get(f"refs/tags/{tag}")


def repo_cache(root: Path, url: str) -> Path:
    """The bare repository that holds what was fetched from ``url``: one per URL (a tag of one repository must
    never stand in for another's)."""
    return cache_dir(root) / f"upstream-git-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def local_repo(root: Path, repo: str, tag: str) -> str:
    """A local git repository holding ``tag``: ``repo`` itself, or a shallow clone of the URL in a cache of
    its own. A tag in the cache is checked against the repository each run (``git ls-remote``) and fetched
    again where it names another commit there; where the repository cannot be reached, the copy fetched from
    it before is used, and that is said."""
    if not _is_url(repo):
        if not Path(repo).exists():
            raise ForkError(f"upstream repo {repo} does not exist (give a git clone, a bare mirror or a URL)")
        if subprocess.run(["git", "-C", repo, "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
            raise ForkError(f"upstream repo {repo} is not a git repository")
        if not _has_tag(repo, tag):
            raise ForkError(f"upstream repo {repo} has no tag {tag}")
        return repo
    clone = repo_cache(root, repo)
    if (clone / "HEAD").exists() and _config(clone, "diffusers-flash.url") != repo:
        shutil.rmtree(clone)  # not what this URL's cache must hold (made by hand, or half made)
    if not (clone / "HEAD").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{clone.name}.", dir=clone.parent if clone.parent.exists()
                                    else _mkdir(clone.parent)))
        _git("init", "-q", "--bare", str(tmp))
        _git("-C", str(tmp), "config", "diffusers-flash.url", repo)
        os.replace(tmp, clone)
    cached = _tag_commit(str(clone), tag)
    reached, remote = remote_tag_commit(repo, tag)
    if not reached:
        if cached is None:
            raise ForkError(f"cannot fetch tag {tag} from {repo} (not reachable); offline, pass --upstream-repo "
                            "with a local clone or mirror of upstream")
        print(f"test-upstream: could not check tag {tag} in {repo} (not reachable): using the copy fetched from it "
              f"before (commit {cached[:12]}) in {clone}", file=sys.stderr)
        return str(clone)
    if remote is None:
        raise ForkError(f"cannot fetch tag {tag} from {repo}: it has no such tag")
    if cached != remote:
        print(f"test-upstream: fetching tag {tag} from {repo} (shallow) into {clone}", file=sys.stderr)
        try:
            _git("-C", str(clone), "fetch", "-q", "--force", "--depth", "1", repo,
                 f"+refs/tags/{tag}:refs/tags/{tag}")
        except ForkError as e:
            raise ForkError(f"cannot fetch tag {tag} from {repo} ({e}); offline, pass --upstream-repo "
                            "with a local clone or mirror of upstream") from None
        if _tag_commit(str(clone), tag) != remote:
            raise ForkError(f"tag {tag} fetched from {repo} is not the commit it names there ({remote[:12]}): "
                            "refused (did the tag move during the fetch? run again)")
    return str(clone)


def _config(repo: Path, key: str) -> str | None:
    r = subprocess.run(["git", "-C", str(repo), "config", "--get", key], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def lay_out(root: Path, repo: str, tag: str) -> Path:
    """Extract upstream's tests and fixtures at ``tag`` into a fresh ``upstream-tests/<tag>/diffusers/``: a
    folder named as upstream's checkout, whose name a test asserts (0.12+ ``test_deprecate_stacklevel``:
    the warning is attributed to ``diffusers/tests/test_utils.py``)."""
    present = set(_git("-C", repo, "ls-tree", "--name-only", tag, "--", *FIXTURES).split())
    if REQUIRED not in present:
        raise ForkError(f"upstream tag {tag} in {repo} has no {REQUIRED}/ folder")
    data = subprocess.run(["git", "-C", repo, "archive", "--format=tar", tag, "--", *sorted(present)],
                          capture_output=True)
    if data.returncode != 0:
        raise ForkError(f"git archive {tag} failed in {repo}: {data.stderr.decode(errors='replace').strip()}")
    base = Path(root) / OUT_DIR / tag.replace("/", "_")
    if base.exists():
        shutil.rmtree(base)
    dest = base / "diffusers"
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:  # Python without extraction filters; git archive writes no links out of the tree
            t.extractall(dest)
    (dest / "pytest.ini").write_text(INI)
    return dest


# ---------------------------------------------------------------- what the tag's test extra needs
def test_requirements(setup_py: str) -> list[str]:
    """The requirements of ``extras["test"]`` (or ``"testing"``) in an upstream ``setup.py``: a literal list,
    or ``deps_list("name", ...)`` looked up in its ``_deps`` table. [] where there is no such extra."""
    try:
        module = ast.parse(setup_py)
    except SyntaxError as e:
        raise ForkError(f"upstream's setup.py does not parse ({e.msg}, line {e.lineno})") from None
    deps, extras = {}, {}
    for node in module.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Name) and target.id == "_deps" and isinstance(value, ast.List):
            for item in value.elts:
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    deps[re.split(r"[!=<>~\[; ]", item.value, maxsplit=1)[0]] = item.value
        elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id == "extras"
              and isinstance(target.slice, ast.Constant) and target.slice.value in TEST_EXTRAS):
            extras[target.slice.value] = value
    value = next((extras[k] for k in TEST_EXTRAS if k in extras), None)
    if value is None:
        return []
    if isinstance(value, ast.List):
        items = value.elts
    elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "deps_list":
        items = value.args
    else:
        raise ForkError("upstream's setup.py builds its test extra in a way test-upstream cannot read: "
                        "install it by hand and pass --no-install")
    names = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    if isinstance(value, ast.Call):
        unknown = [n for n in names if n not in deps]
        if unknown:
            raise ForkError(f"upstream's setup.py: deps_list names {', '.join(unknown)}, which _deps lacks")
        return [deps[n] for n in names]
    return names


def missing_requirements(requirements: list[str]) -> list[str]:
    """Those of ``requirements`` with no installed distribution (an installed one of another version counts
    as there: the stack under test is not changed)."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            raise ForkError(f"upstream's test extra has a requirement pip cannot read: {text!r}") from None
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
    return missing


def pip_command(requirements: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *requirements]


def pip_install(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run pip with every installed distribution held at its version (a constraints file)."""
    held = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() not in ("diffusers", "pip")})
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="test-upstream-held-") as f:
        f.write("\n".join(held) + "\n")
        f.flush()
        return subprocess.run([*cmd, "--constraint", f.name], capture_output=True, text=True)


def installed_distributions() -> set[str]:
    importlib.invalidate_caches()
    return {_canonical(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


IMPORT_CHECK = r"""
import importlib, importlib.metadata as m, json, re, sys
wanted = set(sys.argv[1:])
modules = {}
for entry, dists in m.packages_distributions().items():
    # a top_level.txt may name files ('sentencepiece/__init__'): the module is the first part of the path
    module = re.split(r"[/\\]", entry)[0]
    module = module[:-3] if module.endswith(".py") else module
    if not module.isidentifier() or module.startswith("_") or module in ("test", "tests", "docs", "examples",
                                                                          "benchmarks"):
        continue
    for dist in dists:
        name = re.sub(r"[-_.]+", "-", dist).lower()
        if name in wanted and module not in modules.get(name, []):
            modules.setdefault(name, []).append(module)
broken = {}
for name in sorted(modules):
    for module in sorted(modules[name]):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # the name is no module at all (a data folder, a stray entry): says nothing
                continue
            broken[name] = f"import {module}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"[:200]
            break
        except BaseException as e:
            broken[name] = f"import {module}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"[:200]
            break
print(json.dumps(broken))
"""


def broken_imports(dists) -> dict[str, str]:
    """Of the installed distributions ``dists``, those whose top-level modules do not import in this
    interpreter: name -> the first failing import and its error. A module name read from a distribution's
    metadata is the first part of the path it gives; a name that is no module at all (its import finds
    nothing by that name) is passed over: a distribution that imports is never taken for broken."""
    if not dists:
        return {}
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *sorted(dists)], capture_output=True, text=True,
                       cwd="/", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {d: f"the import check itself failed (exit {r.returncode}): "
                   f"{(r.stderr.strip().splitlines() or ['?'])[-1][:160]}" for d in dists}


def pip_uninstall(names) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *sorted(names)],
                          capture_output=True, text=True)


def ensure_test_requirements(repo: str, tag: str, install: bool, installer=pip_install,
                             check=broken_imports, uninstaller=pip_uninstall) -> dict:
    """Install what the tag's test extra needs and is missing (or refuse, naming the pip command). Returns
    ``{"installed": [requirements], "removed": {distribution: why}}``.

    One pip run per requirement, in the extra's order, each with everything installed so far held: pip's
    resolver, given them all at once, can backtrack for many minutes through old releases (sdists that do
    not build today) where each alone resolves at once (v0.11.1's k-diffusion, librosa and torchvision
    beside a held torch). Then every distribution this brought in must import: one that does not (a
    torchvision built for CUDA torch beside a CPU torch) would break importing transformers, and with it
    every test, so it is uninstalled again and named; the tests that need it then fail as they would."""
    if "setup.py" not in _git("-C", repo, "ls-tree", "--name-only", tag, "--", "setup.py").split():
        return {"installed": [], "removed": {}}
    missing = missing_requirements(test_requirements(_git("-C", repo, "show", f"{tag}:setup.py")))
    if not missing:
        return {"installed": [], "removed": {}}
    cmd = pip_command(missing)
    shown = " ".join(shlex.quote(a) for a in cmd)
    if not install:
        raise ForkError(f"upstream {tag}'s test extra needs {', '.join(missing)}, not installed (without "
                        f"--no-install test-upstream installs them); install them with: {shown}")
    print(f"test-upstream: installing upstream {tag}'s test extra: {', '.join(missing)} ({shown})", flush=True)
    before = installed_distributions()
    failed = {}
    for requirement in missing:
        if not missing_requirements([requirement]):  # came with an earlier one
            continue
        res = installer(pip_command([requirement]))
        if res.returncode or missing_requirements([requirement]):
            name = _requirement_name(requirement)
            by_hand = " ".join(shlex.quote(a) for a in pip_command([requirement]))
            failed[name] = f"pip could not install {requirement} here ({pip_error(res)[:160]}; by hand: {by_hand})"
            print(f"test-upstream: {failed[name]}; the tests that need it skip", flush=True)
    removed = check(installed_distributions() - before)
    if removed:
        uninstaller(removed)
        for name, why in sorted(removed.items()):
            print(f"test-upstream: removed {name} again: it installed but does not import here ({why})", flush=True)
    return {"installed": [r for r in missing if _requirement_name(r) not in failed], "removed": {**failed, **removed}}


def _requirement_name(requirement: str) -> str:
    """The distribution a requirement names ('compel==0.1.8' -> 'compel')."""
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def module_of(why: str, name: str) -> str:
    """The module a removed distribution's import check failed on ("import torchvision: ..."), else its name."""
    m = re.match(r"import ([\w.]+):", why)
    return m.group(1).split(".")[0] if m else name.replace("-", "_")


def pip_error(res: subprocess.CompletedProcess) -> str:
    """The line of pip's output that says what went wrong: its last ``error:``/``ERROR:`` line (not the
    ``hint:`` or ``note:`` after it), else its last line."""
    lines = [ln.strip() for ln in (res.stderr or "").splitlines() + (res.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    return (errors or lines or ["?"])[-1]


# ---------------------------------------------------------------- running them
FORK_UNDER_TEST = r"""
import importlib.metadata as m, importlib.util as u, json, os
s = u.find_spec("diffusers")
try:
    installed = m.version("diffusers")
except m.PackageNotFoundError:
    installed = None
print(json.dumps({"dir": os.path.dirname(s.origin) if s and s.origin else None, "installed": installed}))
"""


def fork_under_test() -> str:
    """``diffusers <version> (upstream <release> laid down; <path>)`` for the code this interpreter would
    import (found, not imported): the version its generated ``_fork_version.py`` holds and the release its
    manifest records, which follow a rebase; the installed metadata's version only where those are absent
    (and named where it differs: metadata is written at install time)."""
    r = subprocess.run([sys.executable, "-c", FORK_UNDER_TEST], capture_output=True, text=True, cwd="/")
    try:
        found = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        found = {"dir": None}
    if r.returncode != 0 or not found.get("dir"):
        raise ForkError(f"diffusers is not installed for {sys.executable}: install the fork first "
                        "(pip install -e . from this repository)")
    where = Path(found["dir"])
    m = re.search(r'^__version__ = "([^"]+)"', _text(where / "_fork_version.py") or "", re.MULTILINE)
    version = m.group(1) if m else found["installed"] or "(version unknown)"
    try:
        laid = json.loads(_text(where / ".upstream-manifest.json") or "{}").get("upstream")
    except (ValueError, AttributeError):
        laid = None
    parts = [f"upstream {laid} laid down" if isinstance(laid, str) else None, str(where)]
    if found["installed"] and found["installed"] != version:
        parts.append(f"the installed metadata says {found['installed']}: 'pip install -e .' again refreshes it")
    return f"diffusers {version} ({'; '.join(p for p in parts if p)})"


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def test_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    scripts = str(Path(__file__).resolve().parent.parent)  # where forklib (and so the plugin) lives
    env["PYTHONPATH"] = os.pathsep.join(p for p in (scripts, env.get("PYTHONPATH")) if p)
    return env


def excluded(where: Path) -> dict:
    """The ``EXCLUDED`` folders present in the laid-out tests: path -> (number of test files, why)."""
    found = {}
    for rel, why in EXCLUDED.items():
        if (where / rel).is_dir():
            found[rel] = (len(list((where / rel).rglob("test_*.py"))), why)
    return found


def run_pytest(where: Path, pytest_args: list) -> tuple[int, dict]:
    report = where / "outcomes.json"
    # the whole of tests/ unless PYTEST_ARGS name what to run in it
    targets = [] if any(a == REQUIRED or a.startswith(REQUIRED + "/") for a in pytest_args) else [REQUIRED]
    left_out = excluded(where)
    ignores = [f"--ignore={rel}" for rel in left_out]
    cmd = [sys.executable, "-m", "pytest", "-p", PLUGIN, "--upstream-report", str(report),
           "-c", "pytest.ini", "--rootdir", ".", "-p", "no:cacheprovider", "-rs", *ignores, *targets, *pytest_args]
    rc = subprocess.run(cmd, cwd=where, env=test_env()).returncode
    if not report.exists():
        raise ForkError(f"pytest exited with status {rc} before writing its report (see its output above)")
    result = json.loads(report.read_text())
    result["excluded"] = {rel: {"files": n, "why": why} for rel, (n, why) in left_out.items()}
    report.write_text(json.dumps(result, indent=1))
    return rc, result


def summary(result: dict, seconds: float) -> str:
    c = result["counts"]
    hub = sorted({d for kind, d in result["outcomes"].values() if kind == "hub"})
    left_out = result.get("excluded", {})
    lines = [f"test-upstream: {c['passed']} passed, {c['failed']} failed, {c['hub']} skipped for the Hub, "
             f"{c['skipped']} skipped by upstream (slow, GPU-only, ...)"
             + (f", {c['upstream-defect']} known upstream test defect(s)" if c.get("upstream-defect") else "")
             + (f", {len(left_out)} folder(s) excluded" if left_out else "")
             + f" in {seconds:.1f}s"]
    if hub:
        lines.append(f"  Hub repos needed: {', '.join(hub)}")
    lines += [f"  NOT INSTALLED {name} (the tag's test extra; tests that need it skip): {why}"
              for name, why in sorted(result.get("removed", {}).items())]
    lines += [f"  EXCLUDED {rel}/ ({e['files']} test file(s)): {e['why']}" for rel, e in left_out.items()]
    lines += [f"  KNOWN UPSTREAM TEST DEFECT (failed, not counted as a failure) {nodeid}: {why}"
              for nodeid, (kind, why) in result["outcomes"].items() if kind == "upstream-defect"]
    lines += [f"  FAILED {nodeid}" for nodeid, (kind, _) in result["outcomes"].items() if kind == "failed"]
    return "\n".join(lines)


def run(root: Path, repo: str | None, tag: str | None, pytest_args: list, deterministic: bool = False,
        install: bool = True) -> int:
    root = Path(root).resolve()
    if deterministic:  # read by our plugin in the pytest process
        os.environ.update(DIFFUSERS_FLASH_DETERMINISTIC="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    pin = load_pin(root)
    tag = tag or pin["tag"]
    if not re.fullmatch(r"[\w.+-]+(/[\w.+-]+)*", tag) or ".." in tag:
        raise ForkError(f"not a tag name: {tag!r}")
    repo = repo or pin.get("repo")
    if not repo:
        raise ForkError("no upstream repo: pass --upstream-repo (upstream.json has no 'repo')")
    fork = fork_under_test()
    repo = local_repo(root, repo, tag)
    extra = ensure_test_requirements(repo, tag, install)
    # the plugin skips, naming it, a test (module) that fails only for want of one of these
    os.environ[NOT_INSTALLED_ENV] = json.dumps({module_of(why, name): why for name, why in extra["removed"].items()})
    where = lay_out(root, repo, tag)
    print(f"test-upstream: upstream {tag} tests in {where.relative_to(root)} against {fork}, offline", flush=True)
    start = time.monotonic()
    rc, result = run_pytest(where, pytest_args)
    result["removed"] = extra["removed"]
    print(summary(result, time.monotonic() - start))
    if result["counts"]["failed"]:
        return 1
    return rc
