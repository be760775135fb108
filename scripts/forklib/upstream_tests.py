"""fork.py test-upstream: run upstream Diffusers' own test suite, unmodified, against the installed fork.

Upstream's ``tests/`` and the repo-root fixtures they load by relative path are taken from a git
clone of upstream at a tag (``git archive``), laid into the git-ignored ``upstream-tests/<tag>/``
and run there with pytest, in a subprocess of this interpreter, offline (``HF_HUB_OFFLINE=1``).
Our plugin (``forklib.upstream_plugin``) does what the fork needs around upstream's files and
reports tests that need the Hugging Face Hub as skipped, naming the repo.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .release import ForkError, cache_dir, load_pin

FIXTURES = ("tests", "hf-internal-testing")  # what upstream's tests need, relative to upstream's root
REQUIRED = "tests"
PLUGIN = "forklib.upstream_plugin"
OUT_DIR = "upstream-tests"
INI = "[pytest]\n# written by fork.py test-upstream: upstream's tests/ run with its own conftest.py only\n"


def add_parser(subparsers, root: Path):
    p = subparsers.add_parser(
        "test-upstream", help="run upstream's own test suite against the installed fork",
        description="Take upstream's tests/ (and the fixtures they use) at TAG from a git clone of upstream, "
                    "lay them into upstream-tests/TAG/ and run them with pytest against the installed fork, "
                    "offline. Tests that need the Hugging Face Hub are skipped, naming the repo; any other "
                    "failure is a failure (exit 1). Arguments after -- go to pytest.")
    p.add_argument("--upstream-repo", metavar="URL_OR_PATH",
                   help="a git clone or bare mirror of upstream (local path), or a URL to clone shallow into "
                        "the cache (default: the pin's repo)")
    p.add_argument("--tag", help="upstream tag whose tests to run (default: the pin's tag)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms, warn_only; cuDNN "
                        "deterministic; CUBLAS_WORKSPACE_CONFIG): tells a nondeterministic GPU kernel from a bug")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="passed on to pytest, e.g. -- -k unet -x")
    p.set_defaults(func=lambda args: run(root, args.upstream_repo, args.tag, _strip_dashes(args.pytest_args),
                                         deterministic=args.deterministic))
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


def local_repo(root: Path, repo: str, tag: str) -> str:
    """A local git repository holding ``tag``: ``repo`` itself, or a shallow clone of the URL in the cache."""
    if not _is_url(repo):
        if not Path(repo).exists():
            raise ForkError(f"upstream repo {repo} does not exist (give a git clone, a bare mirror or a URL)")
        if subprocess.run(["git", "-C", repo, "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
            raise ForkError(f"upstream repo {repo} is not a git repository")
        if not _has_tag(repo, tag):
            raise ForkError(f"upstream repo {repo} has no tag {tag}")
        return repo
    clone = cache_dir(root) / "upstream-git"
    if not (clone / "HEAD").exists():
        _git("init", "-q", "--bare", str(clone))
    if not _has_tag(str(clone), tag):
        print(f"test-upstream: fetching tag {tag} from {repo} (shallow) into {clone}", file=sys.stderr)
        try:
            _git("-C", str(clone), "fetch", "-q", "--depth", "1", repo, f"refs/tags/{tag}:refs/tags/{tag}")
        except ForkError as e:
            raise ForkError(f"cannot fetch tag {tag} from {repo} ({e}); offline, pass --upstream-repo "
                            "with a local clone or mirror of upstream") from None
    return str(clone)


def lay_out(root: Path, repo: str, tag: str) -> Path:
    """Extract upstream's tests and fixtures at ``tag`` into a fresh ``upstream-tests/<tag>/``."""
    present = set(_git("-C", repo, "ls-tree", "--name-only", tag, "--", *FIXTURES).split())
    if REQUIRED not in present:
        raise ForkError(f"upstream tag {tag} in {repo} has no {REQUIRED}/ folder")
    data = subprocess.run(["git", "-C", repo, "archive", "--format=tar", tag, "--", *sorted(present)],
                          capture_output=True)
    if data.returncode != 0:
        raise ForkError(f"git archive {tag} failed in {repo}: {data.stderr.decode(errors='replace').strip()}")
    dest = Path(root) / OUT_DIR / tag.replace("/", "_")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:  # Python without extraction filters; git archive writes no links out of the tree
            t.extractall(dest)
    (dest / "pytest.ini").write_text(INI)
    return dest


# ---------------------------------------------------------------- running them
def fork_under_test() -> str:
    """``diffusers <version> (<path>)`` as this interpreter would import it (without importing it)."""
    code = ("import importlib.metadata as m, importlib.util as u, os; s = u.find_spec('diffusers'); "
            "print(m.version('diffusers'), os.path.dirname(s.origin))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        raise ForkError(f"diffusers is not installed for {sys.executable}: install the fork first "
                        "(pip install -e . from this repository)")
    version, path = r.stdout.split(maxsplit=1)
    return f"diffusers {version} ({path.strip()})"


def test_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    scripts = str(Path(__file__).resolve().parent.parent)  # where forklib (and so the plugin) lives
    env["PYTHONPATH"] = os.pathsep.join(p for p in (scripts, env.get("PYTHONPATH")) if p)
    return env


def run_pytest(where: Path, pytest_args: list) -> tuple[int, dict]:
    report = where / "outcomes.json"
    # the whole of tests/ unless PYTEST_ARGS name what to run in it
    targets = [] if any(a == REQUIRED or a.startswith(REQUIRED + "/") for a in pytest_args) else [REQUIRED]
    cmd = [sys.executable, "-m", "pytest", "-p", PLUGIN, "--upstream-report", str(report),
           "-c", "pytest.ini", "--rootdir", ".", "-p", "no:cacheprovider", "-rs", *targets, *pytest_args]
    rc = subprocess.run(cmd, cwd=where, env=test_env()).returncode
    if not report.exists():
        raise ForkError(f"pytest exited with status {rc} before writing its report (see its output above)")
    return rc, json.loads(report.read_text())


def summary(result: dict, seconds: float) -> str:
    c = result["counts"]
    hub = sorted({d for kind, d in result["outcomes"].values() if kind == "hub"})
    lines = [f"test-upstream: {c['passed']} passed, {c['failed']} failed, {c['hub']} skipped for the Hub, "
             f"{c['skipped']} skipped by upstream (slow, GPU-only, ...)"
             + (f", {c['upstream-defect']} known upstream test defect(s)" if c.get("upstream-defect") else "")
             + f" in {seconds:.1f}s"]
    if hub:
        lines.append(f"  Hub repos needed: {', '.join(hub)}")
    lines += [f"  KNOWN UPSTREAM TEST DEFECT (failed, not counted as a failure) {nodeid}: {why}"
              for nodeid, (kind, why) in result["outcomes"].items() if kind == "upstream-defect"]
    lines += [f"  FAILED {nodeid}" for nodeid, (kind, _) in result["outcomes"].items() if kind == "failed"]
    return "\n".join(lines)


def run(root: Path, repo: str | None, tag: str | None, pytest_args: list, deterministic: bool = False) -> int:
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
    where = lay_out(root, local_repo(root, repo, tag), tag)
    print(f"test-upstream: upstream {tag} tests in {where.relative_to(root)} against {fork}, offline", flush=True)
    start = time.monotonic()
    rc, result = run_pytest(where, pytest_args)
    print(summary(result, time.monotonic() - start))
    if result["counts"]["failed"]:
        return 1
    return rc
