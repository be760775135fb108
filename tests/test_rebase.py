"""fork.py rebase on synthetic upstreams: tiny wheels and git tags made here, a fake index served
from a file:// URL, a fake project root in a temporary git repository. Offline; the real
checkout's files are never touched."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from forklib import release, tree
from forklib import rebase as rebase_tool

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("fork_cli", SCRIPTS / "fork.py")
fork = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fork)


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
PY = sys.executable
PATCHED_10 = "from .flash.ours import f; x10 = f(10)\n"


def a_py(edits=None, prepend=0):
    lines = [f"x{i} = {i}\n" for i in range(1, 31)]
    for n, text in (edits or {}).items():
        lines[n - 1] = text
    return "".join([f"# upstream header line {k}\n" for k in range(prepend)] + lines)


def d_py(edits=None, prepend=0):
    lines = [f"y{i} = {i}\n" for i in range(1, 21)]
    for n, text in (edits or {}).items():
        lines[n - 1] = text
    return "".join([f"# upstream header line {k}\n" for k in range(prepend)] + lines)


D_EDITS = {n: f"y{n} = {n}  # upstream edit\n" for n in (8, 9, 11, 12)}
B_PY = "def g():\n    return 1\n\n\ndef h():\n    return 2\n"
INIT = "VERSION = 'fake'\n"
RELEASES = {
    "1.0.0": {"a.py": a_py()},
    "1.1.0": {"a.py": a_py(prepend=3)},                                # context moved down: offsets
    "1.2.0": {"a.py": a_py({8: "x8 = 8  # upstream edit\n"})},         # context edited: three-way
    "1.3.0": {"a.py": a_py({10: "x10 = 10  # upstream edit\n"})},      # our line edited: conflict
    "1.4.0": {"a.py": a_py(), "__init__.py": "raise ImportError('broken 1.4.0')\n"},
    "1.5.0": {"a.py": a_py(), "b.py": None, "c.py": "def other():\n    return 42\n"},  # patched file gone: .rej
    "1.6.0": {"a.py": a_py(), "b.py": None, "sub/b.py": B_PY + "\n\ndef k():\n    return 3\n"},  # moved: followed
    "1.7.0": {"a.py": a_py({25: "x25 = -25\n"})},                      # upstream has 0002's change
    "1.8.0": {"a.py": a_py({10: "x10 = 10  # upstream edit\n"}, prepend=2)},  # 1.3.0's edit, moved down
    "1.9.0": {"a.py": a_py({10: "x10 = 10  # upstream edit\n"}, prepend=1)},  # and by one line only
    "2.0.0": {"a.py": a_py(), "d.py": d_py()},                          # d.py new (0003 Applies-From 2.0.0)
    "2.1.0": {"a.py": a_py(), "d.py": d_py(prepend=2)},                # its context moved down
    "2.2.0": {"a.py": a_py(), "d.py": d_py(D_EDITS)},                   # its context edited: 0003's main text
    "2.3.0": {"a.py": a_py(), "d.py": d_py(D_EDITS, prepend=3)},       # and moved down
}


def files_of(version):
    files = {"__init__.py": INIT, "b.py": B_PY, **RELEASES[version]}
    return {rel: text for rel, text in files.items() if text is not None}


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(cwd, *args):
    return subprocess.run([*GIT, "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


def snapshot(root):
    """Every file of the project except git's and the work folder's (and its trash), byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", "__pycache__"} & set(p.relative_to(root).parts)
            and not p.relative_to(root).parts[0].startswith(".rebase")}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Wheels in the cache, an index publishing their sha256, an upstream git repo with tags,
    and a project pinned to 1.0.0 with two patches made by 'refresh'."""
    cache, index, upstream, root = (tmp_path / n for n in ("cache", "index", "upstream", "project"))
    cache.mkdir()
    published = {}
    upstream.mkdir()
    git(upstream, "init", "-q")
    for version in RELEASES:
        name = f"diffusers-{version}-py3-none-any.whl"
        with zipfile.ZipFile(cache / name, "w") as z:
            for rel, text in files_of(version).items():
                z.writestr(f"diffusers/{rel}", text)
            z.writestr(f"diffusers-{version}.dist-info/METADATA", f"Name: diffusers\nVersion: {version}\n")
        published[version] = [{"filename": name, "digests": {"sha256": sha(cache / name)}, "url": "file:///nowhere"}]
        for p in (upstream / "src" / "diffusers").rglob("*.py"):
            p.unlink()
        for rel, text in files_of(version).items():
            tree.write(upstream, f"src/diffusers/{rel}", text)
        git(upstream, "add", "-A")
        git(upstream, "commit", "-qm", version, "--allow-empty")
        git(upstream, "tag", f"v{version}")
    (index / "pypi" / "diffusers").mkdir(parents=True)
    (index / "pypi" / "diffusers" / "json").write_text(json.dumps({"releases": published}))
    monkeypatch.setenv("DIFFUSERS_FLASH_CACHE", str(cache))
    monkeypatch.setenv("PIP_INDEX_URL", (index / "simple").as_uri())
    release._index_json.cache_clear()

    root.mkdir()
    git(root, "init", "-q")
    release.save_pin(root, {"package": "diffusers", "version": "1.0.0", "file": "diffusers-1.0.0-py3-none-any.whl",
                            "sha256": published["1.0.0"][0]["digests"]["sha256"], "tag": "v1.0.0",
                            "commit": git(upstream, "rev-parse", "v1.0.0").strip(), "repo": "fake", "fork_release": 1})
    (root / "patches").mkdir()
    (root / "patches" / "series").write_text("")
    (root / ".gitignore").write_text("/.rebase/\n__pycache__/\n")
    tree.write(root, "src/diffusers/flash/ours.py", "def f(x):\n    return x\n")
    git(root, "add", "-A")
    tree.materialize(root, log=lambda m: None)
    make_patch(root, "0001-ours-in-a.patch",
               {"a.py": a_py({10: PATCHED_10}), "b.py": B_PY.replace("return 1", "return -1")})
    make_patch(root, "0002-late-line.patch", {"a.py": a_py({10: PATCHED_10, 25: "x25 = -25\n"})})
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project on 1.0.0")
    assert tree.verify(root) == []
    return {"root": root, "cache": cache, "index": index, "upstream": upstream, "published": published}


def make_patch(root, name, edits):
    for rel, text in edits.items():
        tree.write(root, f"src/diffusers/{rel}", text)
    tree.refresh(root, new_patch=name, log=lambda m: None)


def rebase(env, *args):
    return fork.main(["rebase", "--root", str(env["root"]), *args])


def laid(env, rel):
    return (env["root"] / "src" / "diffusers" / rel).read_text()


def field(env, patch, name):
    text = (env["root"] / "patches" / patch).read_text()
    return next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(name + ":"))


# ---------------------------------------------------------------- a rebase that goes through
def test_rebase_with_offsets_updates_tree_pin_patches_and_doc(env, capsys):
    old_0001 = (env["root"] / "patches" / "0001-ours-in-a.patch").read_bytes()
    assert rebase(env, "v1.1.0") == 0
    out = capsys.readouterr().out
    assert "offsets" in out and "verify: OK" in out
    assert "hunks not applied exactly: none (every hunk clean or at an offset)" in out
    pin = release.load_pin(env["root"])
    assert (pin["version"], pin["tag"], pin["file"]) == ("1.1.0", "v1.1.0", "diffusers-1.1.0-py3-none-any.whl")
    assert pin["sha256"] == env["published"]["1.1.0"][0]["digests"]["sha256"]
    # 1.0.0's commit dropped
    assert list(pin) == ["package", "version", "file", "sha256", "tag", "repo", "fork_release"]
    assert laid(env, "a.py") == a_py({10: PATCHED_10, 25: "x25 = -25\n"}, prepend=3)
    assert tree.verify(env["root"]) == []  # zero fuzz, no offset, tree == pristine 1.1.0 + series
    assert "@@ -10,7 +10,7 @@" in (env["root"] / "patches" / "0001-ours-in-a.patch").read_text()  # re-anchored
    assert field(env, "0001-ours-in-a.patch", "Applies-To") == "1.1.0"  # this text was made for 1.1.0
    assert "Applies to upstream: 1.1.0" in (env["root"] / "PATCHES.md").read_text()
    # a rebase back makes 1.0.0's text again byte for byte (same change, re-anchored): no variant is kept
    assert not (env["root"] / "patches" / "variants").exists()
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "on 1.1.0")
    assert rebase(env, "1.0.0") == 0
    assert (env["root"] / "patches" / "0001-ours-in-a.patch").read_bytes() == old_0001
    assert not (env["root"] / ".rebase").exists()


def test_moved_context_applies_three_way(env, capsys):
    assert rebase(env, "1.2.0") == 0
    out = capsys.readouterr().out
    assert "three-way" in out
    # the report at the end names every hunk that did not apply exactly
    report = out[out.index("hunks not applied exactly"):].splitlines()
    assert report[:2] == ["hunks not applied exactly (1): read these in the rebased tree",
                          "  0001-ours-in-a.patch: a.py hunk 1 (@@ -7,7 +7,7 @@): three-way"], out
    assert laid(env, "a.py") == a_py({8: "x8 = 8  # upstream edit\n", 10: PATCHED_10, 25: "x25 = -25\n"})
    assert tree.verify(env["root"]) == []


def test_rebase_from_a_git_tag_records_the_commit(env, capsys):
    assert rebase(env, "1.1.0", "--upstream-repo", str(env["upstream"])) == 0
    pin = release.load_pin(env["root"])
    assert pin["commit"] == git(env["upstream"], "rev-parse", "v1.1.0^{commit}").strip()
    assert pin["version"] == "1.1.0" and tree.verify(env["root"]) == []
    assert list(pin) == ["package", "version", "file", "sha256", "tag", "commit", "repo", "fork_release"]


def test_upstream_repo_by_url_is_cloned_into_the_cache(env, capsys):
    assert rebase(env, "--check", "1.1.0", "--upstream-repo", env["upstream"].as_uri(), "--no-import") == 0
    assert "| 1.1.0 | offsets |" in capsys.readouterr().out
    assert list(env["cache"].glob("git-*"))


# ---------------------------------------------------------------- a conflict, --continue, --abort
def test_conflict_stops_and_changes_nothing(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.3.0") == 1
    err = capsys.readouterr().err
    assert "0001-ours-in-a.patch" in err and "src/diffusers/a.py: hunk 1 (@@ -7,7 +7,7 @@)" in err
    assert snapshot(env["root"]) == before
    marked = (env["root"] / ".rebase" / "tree" / "src" / "diffusers" / "a.py").read_text()
    assert "<<<<<<< " in marked and PATCHED_10 in marked and "x10 = 10  # upstream edit" in marked


def test_continue_after_resolving(env, capsys):
    assert rebase(env, "1.3.0") == 1
    work_a = env["root"] / ".rebase" / "tree" / "src" / "diffusers" / "a.py"
    assert rebase(env, "--continue") == 2  # markers still there
    assert "a.py" in capsys.readouterr().err
    resolved = a_py({10: "from .flash.ours import f; x10 = f(10)  # upstream edit\n"})
    work_a.write_text(resolved)
    assert rebase(env, "--continue") == 0
    assert laid(env, "a.py") == resolved.replace("x25 = 25\n", "x25 = -25\n")
    assert release.load_pin(env["root"])["version"] == "1.3.0"
    assert field(env, "0001-ours-in-a.patch", "Applies-To") == "1.3.0"  # changed by hand: 1.0.0 has its variant
    # applied unchanged: only its Applies-To follows (as it would from a release with other line numbers)
    assert field(env, "0002-late-line.patch", "Applies-To") == "1.3.0"
    assert tree.verify(env["root"]) == []


def test_file_gone_upstream_leaves_a_rej_and_continue_takes_the_move(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.5.0") == 1
    err = capsys.readouterr().err
    assert "src/diffusers/b.py: hunk 1 (@@ -1,5 +1,5 @@): the file is gone upstream" in err
    assert snapshot(env["root"]) == before
    work = env["root"] / ".rebase" / "tree" / "src" / "diffusers"
    assert "-    return 1\n+    return -1" in (work / "b.py.rej").read_text()
    (work / "c.py").write_text(B_PY.replace("return 1", "return -1"))  # the change, where upstream moved it
    assert rebase(env, "--continue") == 2 and "b.py.rej" in capsys.readouterr().err
    (work / "b.py.rej").unlink()
    assert rebase(env, "--continue") == 0
    assert "+++ b/src/diffusers/c.py" in (env["root"] / "patches" / "0001-ours-in-a.patch").read_text()
    assert laid(env, "c.py") == B_PY.replace("return 1", "return -1") and tree.verify(env["root"]) == []


def test_a_file_upstream_moved_is_followed(env, capsys):
    assert rebase(env, "1.6.0") == 0
    assert "upstream moved b.py -> sub/b.py" in capsys.readouterr().out
    assert laid(env, "sub/b.py") == B_PY.replace("return 1", "return -1") + "\n\ndef k():\n    return 3\n"
    assert "+++ b/src/diffusers/sub/b.py" in (env["root"] / "patches" / "0001-ours-in-a.patch").read_text()
    assert tree.verify(env["root"]) == []


def test_abort_after_conflict(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.3.0") == 1
    assert rebase(env, "--abort") == 0
    assert snapshot(env["root"]) == before and not (env["root"] / ".rebase").exists()
    assert rebase(env, "--abort") == 2  # nothing left to abort
    assert "no rebase in progress" in capsys.readouterr().err


def test_failing_tests_keep_the_result_until_abort_restores_all(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.1.0", "--test-cmd", f"{PY} -c 'raise SystemExit(3)'") == 1
    assert "tests: FAILED" in capsys.readouterr().out
    assert release.load_pin(env["root"])["version"] == "1.1.0"
    assert rebase(env, "1.2.0") == 2  # a rebase is still in progress
    assert rebase(env, "--abort") == 0
    assert snapshot(env["root"]) == before


# ---------------------------------------------------------------- refusals
def test_dirty_tree_is_refused(env, capsys):
    pin = env["root"] / "upstream.json"
    pin.write_text(pin.read_text().replace('"fork_release": 1', '"fork_release": 2'))
    before = snapshot(env["root"])
    assert rebase(env, "1.1.0") == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and "upstream.json" in err
    assert snapshot(env["root"]) == before and not (env["root"] / ".rebase").exists()


def test_dirty_tree_message_names_the_file(env, capsys):
    (env["root"] / "patches" / "0002-late-line.patch").write_text("edited\n")
    assert rebase(env, "1.1.0") == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and "patches/0002-late-line.patch" in err


def test_hand_edit_to_laid_down_file_is_refused(env, capsys):
    (env["root"] / "src" / "diffusers" / "b.py").write_text("edited = True\n")
    assert rebase(env, "1.1.0") == 2
    assert "hand edits" in capsys.readouterr().err


def test_hash_mismatch_is_refused(env, capsys):
    doc = json.loads((env["index"] / "pypi" / "diffusers" / "json").read_text())
    doc["releases"]["1.1.0"][0]["digests"]["sha256"] = "0" * 64
    (env["index"] / "pypi" / "diffusers" / "json").write_text(json.dumps(doc))
    release._index_json.cache_clear()
    before = snapshot(env["root"])
    assert rebase(env, "1.1.0") == 2
    err = capsys.readouterr().err
    assert "does not match the sha256 the index publishes" in err and "0" * 64 in err
    assert snapshot(env["root"]) == before


def test_git_tag_differing_from_the_release_file_is_refused(env, capsys):
    git(env["upstream"], "checkout", "-q", "v1.1.0")
    tree.write(env["upstream"], "src/diffusers/b.py", "different = 1\n")
    git(env["upstream"], "commit", "-qam", "retag")
    git(env["upstream"], "tag", "-f", "v1.1.0")
    assert rebase(env, "1.1.0", "--upstream-repo", str(env["upstream"])) == 2
    assert "differ in 1 file(s): src/diffusers/b.py" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["banana"], "not a release version"),
    ([], "name one TARGET"),
    (["1.1.0", "1.2.0"], "name one TARGET"),
    (["9.9.9"], "publishes no sha256"),
    (["--check"], "--check needs releases"),
    (["--continue"], "no rebase in progress"),
    (["1.1.0", "--upstream-repo", "/no/such/dir"], "no such directory"),
])
def test_bad_input_gets_a_clear_error(env, capsys, argv, message):
    assert rebase(env, *argv) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- --check
def expected_rows(out):
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if re.match(r"\| \d+\.", ln)]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.mark.parametrize("source", ["index", "git"])
def test_check_table(env, capsys, source):
    before = snapshot(env["root"])
    extra = ["--upstream-repo", str(env["upstream"])] if source == "git" else []
    assert rebase(env, "--check", "1.0.0..1.6.0", *extra) == 1  # 1.3.0 and 1.5.0 conflict
    rows = expected_rows(capsys.readouterr().out)
    checked = [v for v in RELEASES if v < "1.7.0"]
    assert [rows[v][0] for v in checked] == ["clean", "offsets", "three-way", "conflict", "clean", "conflict", "clean"]
    assert rows["1.6.0"][1] == "0001 (upstream moved b.py -> sub/b.py)"
    assert rows["1.5.0"][1] == "0001-ours-in-a.patch: b.py (gone upstream)"
    assert rows["1.1.0"][1] == "offsets: 0001 x1, 0002 x1"
    assert rows["1.2.0"][1] == "0001 three-way: a.py hunk 1"
    assert rows["1.3.0"][1] == "0001-ours-in-a.patch: a.py"
    assert rows["1.3.0"][2] == "0002 clean" and rows["1.2.0"][2] == "-"  # how the later patches fare
    assert rows["1.0.0"][3] == "ok (no pipeline classes)" and rows["1.3.0"][3] == "-"
    assert rows["1.4.0"][3] == "FAIL: ImportError: broken 1.4.0"
    assert rows["1.0.0"][4] == "not run"
    assert snapshot(env["root"]) == before and not (env["root"] / ".rebase").exists()


def test_check_runs_tests_on_each_release_when_asked(env, capsys):
    # passes only where the patched tree of 1.1.0 (its header lines, our x25) is the one imported
    cmd = (f"{PY} -c 'import inspect, diffusers.a as a; "
           "assert a.x25 == -25 and \"# upstream header\" in inspect.getsource(a)'")
    assert rebase(env, "--check", "1.1.0", "1.2.0", "--tests", "--test-cmd", cmd) == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][4] == f"{cmd[:60]}: passed"
    assert rows["1.2.0"][4].startswith(f"{cmd[:60]}: FAIL: AssertionError")


def test_check_tests_column_says_which_tests_ran_with_their_counts(env, capsys):
    tests = env["root"] / "tests"
    tests.mkdir()
    (tests / "test_project.py").write_text(
        "import pytest\n\n\ndef test_a():\n    import diffusers.a as a\n    assert a.x25 == -25\n\n\n"
        "def test_b():\n    pass\n\n\n@pytest.mark.skip(reason='x')\ndef test_c():\n    pass\n")
    assert rebase(env, "--check", "1.1.0", "1.3.0", "--tests") == 1
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][4] == "project: 2 passed, 1 skipped"
    assert rows["1.3.0"][4] == "not run"  # the series does not apply there
    assert rebase(env, "--check", "1.1.0") == 0
    assert expected_rows(capsys.readouterr().out)["1.1.0"][4] == "not run"  # no --tests


def test_rebase_lines_name_every_inexact_hunk_of_a_patch():
    from forklib import rebase as rb

    def hunk(n, how):
        return {"path": "src/diffusers/a.py", "hunk": n, "at": f"@@ -{n},3 +{n},4 @@", "how": how, "offset": None}

    res = {"name": "0003-x.patch", "status": "fuzz", "conflicts": [], "moved": {},
           "hunks": [hunk(1, "clean"), hunk(2, "three-way"), hunk(3, "fuzz")]}
    hand = {"name": "0004-y.patch", "status": "resolved", "moved": {}, "hunks": [hunk(1, "conflict")],
            "conflicts": [{"path": "src/diffusers/b.py", "kind": "markers", "rej": None}]}
    assert rb.inexact_hunks([res, hand]) == ["  0003-x.patch: a.py hunk 2 (@@ -2,3 +2,4 @@): three-way",
                                             "  0003-x.patch: a.py hunk 3 (@@ -3,3 +3,4 @@): fuzz",
                                             "  0004-y.patch: resolved by hand in b.py"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        rb.print_result(res)
    assert "three-way: a.py hunk 2" in out.getvalue() and "fuzz: a.py hunk 3" in out.getvalue()


# ---------------------------------------------------------------- fuzz, where a three-way merge conflicts
def _insertion_patch(base, new):
    from forklib import patchfile

    return patchfile.parse(patchfile.diff_file("src/diffusers/m.py", base, new), "p").files[0]


def test_fuzz_places_a_line_beside_one_upstream_changed():
    from forklib import patchfile, rebase

    base = "".join(f"line {i}\n" for i in range(1, 13))
    ours = base.replace("line 6\n", "line 6\nOURS\n")
    theirs = base.replace("line 6\n", "line 6 (upstream reflowed it)\n")
    fp = _insertion_patch(base, ours)
    assert None in patchfile.apply_hunks(fp, theirs)[1]  # no zero-fuzz place
    merged, conflicts = rebase.merge3(ours, base, theirs, ("ours", "base", "theirs"))
    assert conflicts  # git merge-file calls adjacent edits a conflict
    text, hunks, conflict = rebase.rebase_file(fp, base, ours, theirs, ("ours", "base", "theirs"))
    assert conflict is None and [h["how"] for h in hunks] == ["fuzz"]
    assert text == theirs.replace("line 6 (upstream reflowed it)\n", "line 6 (upstream reflowed it)\nOURS\n")


def test_fuzz_never_guesses_between_two_places():
    from forklib import patchfile

    base = "a\nb\nc\nX\nd\ne\nf\n"
    fp = _insertion_patch(base, base.replace("X\n", "X\nOURS\n"))
    theirs = "a\nb\nC\nX2\nd\ne\nf\nq\nd\ne\nf\n"  # the trailing anchor "d e f" now stands twice
    assert patchfile.apply_hunks_fuzzy(fp, theirs)[0] is None


def test_a_file_upstream_renamed_is_followed():
    from forklib import rebase

    old = {"src/diffusers/p/pipeline_x_onnx.py": B_PY}
    new = {"src/diffusers/p/pipeline_onnx_x.py": B_PY + "\n# new upstream line\n",
           "src/diffusers/p/other.py": "y = 1\n"}
    assert rebase.moved_to("src/diffusers/p/pipeline_x_onnx.py", B_PY, new, old) == "src/diffusers/p/pipeline_onnx_x.py"
    assert rebase.moved_to("src/diffusers/p/pipeline_x_onnx.py", B_PY, {"src/diffusers/q.py": "z = 2\n"}, old) is None


# ---------------------------------------------------------------- series variants
RESOLVED_1_3 = a_py({10: "from .flash.ours import f; x10 = f(10)  # upstream edit\n"})


def add_variant(env, name, label, applies, a_text):
    """patches/variants/<name>/<label>.patch: 0001's change written against 1.3.0's a.py (b.py as in 0001)."""
    from forklib import patchfile

    body = (patchfile.diff_file("src/diffusers/a.py", files_of("1.3.0")["a.py"], a_text)
            + patchfile.diff_file("src/diffusers/b.py", B_PY, B_PY.replace("return 1", "return -1")))
    header = f"Description: ours in a, for {label}\nOrigin: test\nApplies-To: {applies}\n"
    path = env["root"] / "patches" / "variants" / name.removesuffix(".patch") / f"{label}.patch"
    tree.write(path.parent, path.name, patchfile.render(header, [body]))
    tree.write_patches_doc(env["root"])
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", f"variant {label}")
    return path


def test_the_variant_serving_the_target_is_used(env, capsys):
    path = add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    variant = path.read_bytes()
    assert tree.verify(env["root"]) == []
    assert rebase(env, "1.3.0") == 0  # stops at 0001 without the variant (test_conflict_stops_and_changes_nothing)
    assert "from patches/variants/0001-ours-in-a/1.3.0.patch" in capsys.readouterr().out
    assert laid(env, "a.py") == RESOLVED_1_3.replace("x25 = 25\n", "x25 = -25\n")
    assert (env["root"] / "patches" / "0001-ours-in-a.patch").read_bytes() == variant  # promoted as it was
    assert not path.exists() and tree.verify(env["root"]) == []


def test_a_variant_for_another_release_is_not_used(env, capsys):
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    assert rebase(env, "1.2.0") == 0  # the main patch, three-way
    out = capsys.readouterr().out
    assert "three-way" in out and "from patches/variants" not in out
    assert laid(env, "a.py") == a_py({8: "x8 = 8  # upstream edit\n", 10: PATCHED_10, 25: "x25 = -25\n"})


def test_applies_to_lists_and_ranges():
    from forklib import variants

    assert variants.covers("0.4.0..0.4.1, 0.6.0", "0.4.1") and variants.covers("0.4.0..0.4.1, 0.6.0", "0.6.0")
    assert not variants.covers("0.4.0..0.4.1, 0.6.0", "0.4.2") and not variants.covers("0.4.2", "0.4.20")
    assert variants.covers("v0.10.0..0.12.1", "0.11.0") and not variants.covers("0.10.0..0.12.1", "0.9.0")


def test_round_trip_through_a_variant_restores_everything_byte_for_byte(env, capsys):
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]  # from git, so that the pin gets its commit back
    assert rebase(env, "1.3.0", *repo) == 0
    on_1_3 = snapshot(env["root"])
    assert on_1_3 != before and "patches/variants/0001-ours-in-a/1.0.0.patch" in on_1_3
    assert on_1_3["patches/variants/0001-ours-in-a/1.0.0.patch"] == before["patches/0001-ours-in-a.patch"]
    assert b"Variants in `patches/variants/0001-ours-in-a/`: 1.0.0\n" in on_1_3["PATCHES.md"]
    git(env["root"], "commit", "-qam", "on 1.3.0")
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "variants")
    assert rebase(env, "1.0.0", *repo) == 0
    assert "from patches/variants/0001-ours-in-a/1.0.0.patch" in capsys.readouterr().out
    assert snapshot(env["root"]) == before  # series, patches, variants, PATCHES.md, pin and laid-down tree


def test_round_trip_through_two_releases_one_variant_serves_is_byte_identical(env, capsys):
    """A variant serving a range (1.3.0..1.9.0, written for 1.8.0) becomes the main text on 1.8.0, is re-anchored
    on 1.9.0, and on the way back to 1.0.0 keeps its one file: no second variant named after 1.9.0."""
    from forklib import patchfile

    resolved = a_py({10: "from .flash.ours import f; x10 = f(10)  # upstream edit\n"}, prepend=2)
    body = (patchfile.diff_file("src/diffusers/a.py", files_of("1.8.0")["a.py"], resolved)
            + patchfile.diff_file("src/diffusers/b.py", B_PY, B_PY.replace("return 1", "return -1")))
    path = env["root"] / "patches" / "variants" / "0001-ours-in-a" / "1.8.0.patch"
    tree.write(path.parent, path.name, patchfile.render("Description: ours in a, for 1.3 to 1.9\nOrigin: test\n"
                                                        "Applies-To: 1.3.0..1.9.0\n", [body]))
    tree.write_patches_doc(env["root"])
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "variant for 1.3.0..1.9.0")
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]  # from git: the commit is not what this test is about
    for target in ("1.8.0", "1.9.0", "1.0.0"):
        assert rebase(env, target, *repo) == 0, capsys.readouterr()
        assert tree.verify(env["root"]) == []
        git(env["root"], "add", "-A")
        git(env["root"], "commit", "-qm", f"on {target}")
    assert snapshot(env["root"]) == before


def test_a_promoted_variant_comes_back_under_its_own_name(env, capsys):
    """A variant named after the last release of its range (1.9.0.patch for 1.3.0..1.9.0) that applies clean on
    1.3.0 becomes the main text there; the way back keeps it as 1.9.0.patch again, not as 1.3.0.patch."""
    add_variant(env, "0001-ours-in-a.patch", "1.9.0", "1.3.0..1.9.0", RESOLVED_1_3)
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]
    assert rebase(env, "1.3.0", *repo) == 0, capsys.readouterr()
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "on 1.3.0")
    assert rebase(env, "1.0.0", *repo) == 0, capsys.readouterr()
    assert snapshot(env["root"]) == before


@pytest.mark.parametrize("trip", [("1.3.0", "1.8.0", "1.0.0"), ("1.3.0", "1.9.0", "1.0.0")])
def test_a_trip_through_several_releases_keeps_each_variant(env, capsys, trip):
    """A variant promoted to the main text on its release (1.3.0) is kept under its own name when the series
    moves on to another release, even where a rebase back from there would make its text again: the way to
    the pin does not pass there, and from the pin the release needs its variant (0.4.2 -> 0.13.1 -> 0.14.0
    -> 0.4.2 lost 0.13.1's variants of 0003, 0004 and 0009)."""
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]
    for target in trip:
        assert rebase(env, target, *repo) == 0, capsys.readouterr()
        git(env["root"], "add", "-A")
        git(env["root"], "commit", "-qm", f"on {target}")
    after = snapshot(env["root"])
    lost = [k for k in before if k != "PATCHES.md" and after.get(k) != before[k]]
    assert lost == [], lost  # every variant (1.3.0's too), the series, the pin and the laid-down tree
    # a release visited on the way (1.8.0/1.9.0, served from 1.3.0's text) may leave a variant of its own
    assert all(k.startswith("patches/variants/") or k == "PATCHES.md" for k in set(after) - set(before))


def test_round_trip_from_the_index_gets_the_commit_back_from_the_committed_pin(env, capsys):
    before = snapshot(env["root"])
    assert rebase(env, "1.1.0") == 0  # from the index: 1.1.0's commit is not known
    assert "commit" not in release.load_pin(env["root"])
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "on 1.1.0")
    assert rebase(env, "1.0.0") == 0  # 1.0.0 was pinned, with its commit, in an earlier commit
    assert "as pinned before in this project's history" in capsys.readouterr().out
    assert release.load_pin(env["root"])["commit"] == git(env["upstream"], "rev-parse", "v1.0.0^{commit}").strip()
    assert snapshot(env["root"]) == before


def test_a_replaced_text_upstream_has_on_the_old_release_is_kept_for_the_release_it_served(env, capsys):
    """0001 is upstream's from 1.8.0 on; a rebase 1.8.0 -> 1.3.0 takes 1.3.0's variant as the main text and keeps
    the old one as the 1.0.0 variant it is (not as 1.8.0's, which it never served), so the way back is identical."""
    upstream_since(env, "0001-ours-in-a.patch", "1.8.0")
    variant = add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    variant.write_text(variant.read_text().replace("\nApplies-To:", "\nApplied-Upstream: 1.8.0\nApplies-To:", 1))
    tree.write_patches_doc(env["root"])
    git(env["root"], "commit", "-qam", "the variant says so too")
    assert tree.verify(env["root"]) == []
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]
    for target in ("1.8.0", "1.3.0"):
        assert rebase(env, target, *repo) == 0, capsys.readouterr()
        git(env["root"], "add", "-A")
        git(env["root"], "commit", "-qm", f"on {target}")
    kept = env["root"] / "patches" / "variants" / "0001-ours-in-a"
    assert sorted(p.name for p in kept.iterdir()) == ["1.0.0.patch"]
    assert (kept / "1.0.0.patch").read_bytes() == before["patches/0001-ours-in-a.patch"]
    assert rebase(env, "1.0.0", *repo) == 0, capsys.readouterr()
    assert snapshot(env["root"]) == before


def test_continue_records_the_resolution_for_the_next_time(env, capsys):
    assert rebase(env, "1.3.0") == 1
    (env["root"] / ".rebase" / "tree" / "src" / "diffusers" / "a.py").write_text(RESOLVED_1_3)
    assert rebase(env, "--continue") == 0
    resolved = snapshot(env["root"])
    assert "patches/variants/0001-ours-in-a/1.0.0.patch" in resolved
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "on 1.3.0")
    assert rebase(env, "1.0.0") == 0  # back, from the variant kept for 1.0.0
    assert (env["root"] / "patches" / "variants" / "0001-ours-in-a" / "1.3.0.patch").is_file()  # the resolution
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "back on 1.0.0")
    capsys.readouterr()
    assert rebase(env, "1.3.0") == 0  # no human this time
    assert "from patches/variants/0001-ours-in-a/1.3.0.patch" in capsys.readouterr().out
    assert snapshot(env["root"]) == resolved


def test_a_variant_that_does_not_fit_stops_with_a_rej(env, capsys):
    add_variant(env, "0001-ours-in-a.patch", "1.2.0", "1.2.0", RESOLVED_1_3)  # written for 1.3.0's line 10
    before = snapshot(env["root"])
    assert rebase(env, "1.2.0") == 1
    err = capsys.readouterr().err
    assert "src/diffusers/a.py: hunk 1" in err and "the variant's lines are not there" in err
    rej = env["root"] / ".rebase" / "tree" / "src" / "diffusers" / "a.py.rej"
    assert "-x10 = 10  # upstream edit" in rej.read_text()
    assert snapshot(env["root"]) == before


def test_check_table_uses_variants(env, capsys):
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    assert rebase(env, "--check", "1.2.0", "1.3.0", "--no-import") == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.3.0"][:2] == ["clean", "variants: 0001 variant 1.3.0"]
    assert rows["1.2.0"][:2] == ["three-way", "0001 three-way: a.py hunk 1"]


def test_verify_reports_bad_variants(env):
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    assert tree.verify(env["root"]) == []
    folder = env["root"] / "patches" / "variants" / "0001-ours-in-a"
    (folder / "1.3.0.patch").rename(folder / "1.9.0.patch")
    tree.write(env["root"] / "patches" / "variants" / "0099-gone", "1.0.0.patch", "Description: x\n")
    problems = tree.verify(env["root"])
    assert "patches/variants/0001-ours-in-a/1.9.0.patch: its Applies-To (1.3.0) does not cover 1.9.0" in problems
    assert "patches/variants/0099-gone: no patch of that name in patches/series" in problems


def test_two_variants_serving_a_release_are_refused_unless_one_is_named_after_it():
    from forklib import variants
    from forklib.release import ForkError

    vs = [{"label": "1.2.0", "applies": "1.2.0..1.3.0", "rel": "v/1.2.0.patch"},
          {"label": "1.3.0", "applies": "1.3.0..1.4.0", "rel": "v/1.3.0.patch"}]
    assert variants.choose(vs, "1.3.0")["label"] == "1.3.0" and variants.choose(vs, "1.2.5")["label"] == "1.2.0"
    assert variants.choose(vs, "1.5.0") is None
    vs[1]["label"] = "1.3.5"
    with pytest.raises(ForkError, match="2 variants serve 1.3.0"):
        variants.choose(vs, "1.3.0")


def test_refresh_warns_that_variants_need_the_same_change(env):
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    tree.write(env["root"], "src/diffusers/b.py",
               B_PY.replace("return 1", "return -1").replace("return 2", "return -2"))
    said = []
    tree.refresh(env["root"], log=said.append)
    assert any(m.startswith("warning: 0001-ours-in-a.patch has variants (variants/0001-ours-in-a/1.3.0.patch)")
               for m in said)


# ---------------------------------------------------------------- Applied-Upstream: patches upstream has
def upstream_since(env, name, version, doc=True, field="Applied-Upstream"):
    """Declare in ``name``'s header (DEP-3's ``Applied-Upstream``, or ``field``) that upstream has its change
    from ``version`` on; commit."""
    path = env["root"] / "patches" / name
    text = re.sub(r"\n(Applied-Upstream|Upstream-Since): .*", "", path.read_text(), count=1)
    path.write_text(text.replace("\nApplies-To:", f"\n{field}: {version}\nApplies-To:", 1))
    if doc:
        tree.write_patches_doc(env["root"])
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", f"{name} upstream since {version}")
    return path


def test_a_patch_upstream_has_is_skipped_from_that_release_on_and_applied_before(env, capsys):
    assert rebase(env, "--check", "1.1.0", "1.7.0", "--no-import") == 1  # 1.7.0: 0002 changes nothing there
    assert expected_rows(capsys.readouterr().out)["1.7.0"][0] == "empty"
    upstream_since(env, "0002-late-line.patch", "1.7.0")
    assert tree.verify(env["root"]) == []  # on 1.0.0 it is applied as before
    assert "Applied upstream: 1.7.0" in (env["root"] / "PATCHES.md").read_text()
    assert rebase(env, "--check", "1.1.0", "1.7.0", "--no-import") == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][:2] == ["offsets", "offsets: 0001 x1, 0002 x1"]  # before the release: applied
    assert rows["1.7.0"][:2] == ["clean", "0002 upstream since 1.7.0"]  # from it on: skipped


def test_round_trip_past_applied_upstream_is_byte_identical(env, capsys):
    patch = upstream_since(env, "0002-late-line.patch", "1.7.0")
    text, before = patch.read_bytes(), snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]
    assert rebase(env, "1.7.0", *repo) == 0
    out = capsys.readouterr().out
    assert "0002-late-line.patch" in out and "upstream since 1.7.0: not applied" in out and "verify: OK" in out
    assert release.load_pin(env["root"])["version"] == "1.7.0"
    assert laid(env, "a.py") == a_py({10: PATCHED_10, 25: "x25 = -25\n"})  # 0001 ours, line 25 upstream's
    assert patch.read_bytes() == text and "0002-late-line.patch" in tree.series(env["root"])  # kept as it is
    assert tree.verify(env["root"]) == []
    assert "2 patches, 1 applied (0002 upstream since 1.7.0)" in tree.status_line(env["root"])
    tree.materialize(env["root"], log=lambda m: None)  # materialize on the new pin skips it too
    assert laid(env, "a.py") == a_py({10: PATCHED_10, 25: "x25 = -25\n"})
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "on 1.7.0")
    assert rebase(env, "1.0.0", *repo) == 0
    assert "0002-late-line.patch" in capsys.readouterr().out
    assert laid(env, "a.py") == a_py({10: PATCHED_10, 25: "x25 = -25\n"})  # applied again, from its text
    assert snapshot(env["root"]) == before  # series, patches, PATCHES.md, pin and laid-down tree


def test_verify_checks_applied_upstream(env):
    upstream_since(env, "0002-late-line.patch", "1.7.0")
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    assert tree.verify(env["root"]) == []
    upstream_since(env, "0001-ours-in-a.patch", "2.0")  # the main patch says so, its variant does not
    problems = tree.verify(env["root"])
    assert any("0001-ours-in-a/1.3.0.patch: Applied-Upstream (none) but 0001-ours-in-a.patch says 2.0" in p
               for p in problems)
    upstream_since(env, "0002-late-line.patch", "soon", doc=False)
    assert any("Applied-Upstream: 'soon' is not a release version" in p for p in tree.verify(env["root"]))


# ---------------------------------------------------------------- Applies-From: code that came in later
D_PATCHED = "from .flash.ours import f; y10 = f(10)\n"


def add_applies_from(env):
    """0003-new-code.patch changes d.py, which upstream added in 2.0.0 (``Applies-From: 2.0.0``): the main text
    written for 2.2.0 (serving 2.2.0..2.3.0, the newest releases), a variant written for 2.0.0 (2.0.0..2.1.0)."""
    from forklib import patchfile

    def text(label, applies, before):
        after = "".join(D_PATCHED if ln == "y10 = 10\n" else ln for ln in before.splitlines(True))
        header = (f"Description: ours in d, written for {label}\nOrigin: test\nApplies-From: 2.0.0\n"
                  f"Applies-To: {applies}\n")
        return patchfile.render(header, [patchfile.diff_file("src/diffusers/d.py", before, after)])

    root = env["root"]
    (root / "patches" / "0003-new-code.patch").write_text(text("2.2.0", "2.2.0..2.3.0", d_py(D_EDITS)))
    tree.write(root / "patches" / "variants" / "0003-new-code", "2.0.0.patch", text("2.0.0", "2.0.0..2.1.0", d_py()))
    (root / "patches" / "series").write_text((root / "patches" / "series").read_text() + "0003-new-code.patch\n")
    tree.write_patches_doc(root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "0003 from 2.0.0")


def test_a_patch_applies_from_the_release_that_has_its_code(env, capsys):
    add_applies_from(env)
    assert tree.verify(env["root"]) == []  # not applied on the pin (no d.py there), and nothing is missing
    assert "3 patches, 2 applied (0003 from 2.0.0)" in tree.status_line(env["root"])
    assert "Applies from: 2.0.0" in (env["root"] / "PATCHES.md").read_text()
    assert rebase(env, "--check", "1.1.0", "2.0.0", "2.1.0", "2.2.0", "2.3.0", "--no-import") == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][1].startswith("0003 from 2.0.0")
    assert "0003 variant 2.0.0" in rows["2.0.0"][1] and "0003 variant 2.0.0" in rows["2.1.0"][1]
    assert "0003" not in rows["2.2.0"][1] and "0003 x1" in rows["2.3.0"][1]  # the main text; offsets
    assert rebase(env, "2.1.0", "--no-tests") == 0
    assert laid(env, "d.py") == d_py({10: D_PATCHED}, prepend=2)


@pytest.mark.parametrize("trip", [("2.0.0", "1.0.0"), ("2.1.0", "1.0.0"), ("2.2.0", "1.0.0"), ("2.3.0", "1.0.0"),
                                  ("2.0.0", "2.3.0", "1.0.0"), ("2.3.0", "2.1.0", "1.1.0", "1.0.0")])
def test_round_trip_through_releases_a_patch_applies_from_is_byte_identical(env, capsys, trip):
    """On the way out the text serving the release becomes the main one; on the way back to a release older
    than Applies-From the text for the newest release the patch serves is the main one again, and nothing is
    left behind that a rebase from the pin would make again."""
    add_applies_from(env)
    before = snapshot(env["root"])
    repo = ["--upstream-repo", str(env["upstream"])]
    for target in trip:
        assert rebase(env, target, "--no-tests", *repo) == 0, capsys.readouterr()
        assert tree.verify(env["root"]) == []
        if target.startswith("2."):
            assert "y10 = f(10)" in laid(env, "d.py")
        git(env["root"], "add", "-A")
        git(env["root"], "commit", "-qm", f"on {target}")
    after = snapshot(env["root"])
    assert [k for k in set(before) | set(after) if before.get(k) != after.get(k)] == []


def test_the_newest_text_of_a_patch_is_chosen_by_the_last_release_it_serves():
    from forklib import variants

    body = "\n--- a/src/diffusers/d.py\n+++ b/src/diffusers/d.py\n@@ -1 +1 @@\n-y1 = 1\n+y1 = 2\n"
    main = "Description: d\nApplies-To: 2.2.0\n" + body
    found = [{"applies": "2.0.0..2.1.0", "rel": "v/2.0.0.patch"}, {"applies": "2.2.0..2.3.0", "rel": "v/2.3.0.patch"}]
    assert variants.newest(found, main)["rel"] == "v/2.3.0.patch"
    assert variants.newest(found[:1], main) is None  # the main text serves a newer release
    assert variants.newest(found, "Description: d\nApplies-To: 2.0.0, 2.4.0\n" + body) is None
    assert variants.newest(found, main.replace("2.2.0", "2.3.0"))["rel"] == "v/2.3.0.patch"  # a tie: the variant


def test_verify_checks_applies_from(env):
    add_applies_from(env)
    variant = env["root"] / "patches" / "variants" / "0003-new-code" / "2.0.0.patch"
    variant.write_text(variant.read_text().replace("Applies-From: 2.0.0", "Applies-From: 1.9.0"))
    assert any("2.0.0.patch: Applies-From 1.9.0 but 0003-new-code.patch says 2.0.0" in p
               for p in tree.verify(env["root"]))
    variant.write_text(variant.read_text().replace("Applies-From: 1.9.0", "Applies-From: later"))
    assert any("Applies-From: 'later' is not a release version" in p for p in tree.verify(env["root"]))


def test_the_old_field_name_upstream_since_is_still_read(env, capsys):
    """A patch file written before the series took DEP-3's name says ``Upstream-Since``: the same meaning, and
    it agrees with a variant that says ``Applied-Upstream``."""
    upstream_since(env, "0002-late-line.patch", "1.7.0", field="Upstream-Since")
    assert tree.verify(env["root"]) == []
    assert "Applied upstream: 1.7.0" in (env["root"] / "PATCHES.md").read_text()
    assert rebase(env, "--check", "1.7.0", "--no-import") == 0
    assert expected_rows(capsys.readouterr().out)["1.7.0"][:2] == ["clean", "0002 upstream since 1.7.0"]
    upstream_since(env, "0001-ours-in-a.patch", "2.0", field="Upstream-Since")
    variant = add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    variant.write_text(variant.read_text().replace("\nApplies-To:", "\nApplied-Upstream: 2.0\nApplies-To:", 1))
    tree.write_patches_doc(env["root"])
    assert tree.verify(env["root"]) == []
    upstream_since(env, "0002-late-line.patch", "soon", doc=False, field="Upstream-Since")
    assert any("Upstream-Since: 'soon' is not a release version" in p for p in tree.verify(env["root"]))


# ---------------------------------------------------------------- what the fork tool checks (issue 19)
KILLER = '''"""Run a script, killed (SIGKILL) halfway through the first write whose data holds KILL_MARK."""
import builtins, io, os, runpy, signal, sys

MARK = os.environ.get("KILL_MARK", "").encode()
real_open = io.open


class Killing:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if MARK and MARK in raw:
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def hooked(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Killing(f) if any(c in mode for c in "wax+") else f


io.open = builtins.open = hooked

UNLINKS = int(os.environ.get("KILL_UNLINK", "0"))  # SIGKILL at the Nth file removed by an rmtree of .rebase*
if UNLINKS:
    import shutil

    real_rmtree, real_unlink, state = shutil.rmtree, os.unlink, {"on": False, "n": 0}

    def rmtree(path, *args, **kwargs):
        state["on"] = state["on"] or os.path.basename(os.fspath(path)).startswith(".rebase")
        return real_rmtree(path, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        if state["on"]:
            state["n"] += 1
            if state["n"] == UNLINKS:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_unlink(path, *args, **kwargs)

    shutil.rmtree, os.unlink = rmtree, unlink
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def cli(env, *args, kill_at=None, kill_unlink=None, popen=False):
    """``python <project>/scripts/fork.py ARGS`` on the env project (its own copy of the tool, so that ROOT is
    the project); ``kill_at``: SIGKILLed halfway through the first write of data holding that text;
    ``kill_unlink``: SIGKILLed at that file removed by the clean-up of the work folder."""
    root = env["root"]
    if not (root / "scripts").exists():
        shutil.copytree(SCRIPTS, root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "scripts" / "killer.py").write_text(KILLER)
    cmd = [PY, str(root / "scripts" / "fork.py"), *args]
    run_env = dict(os.environ, DIFFUSERS_FLASH_LOCK_WAIT="0.2")
    if kill_at or kill_unlink:
        cmd = [PY, str(root / "scripts" / "killer.py"), *cmd[1:]]
        run_env.update(KILL_MARK=kill_at or "", KILL_UNLINK=str(kill_unlink or 0))
    if popen:
        # SIGINT as a terminal gives it: a runner started in the background by a shell without job control
        # (CI scripts, `(cmd &)`) passes it on ignored, and Python then never raises KeyboardInterrupt
        return subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, env=run_env, capture_output=True, text=True)


def one_line_error(res, *expect):
    """A refusal: exit 2, one line on stderr holding each of ``expect``, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for text in expect:
        assert text in res.stderr, res.stderr
    return res.stderr


def tamper_release(env, version="1.0.0"):
    """Put code of an attacker's into the cached release file (its sha256 no longer matches the pin)."""
    path = env["cache"] / f"diffusers-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for rel, text in files_of(version).items():
            z.writestr(f"diffusers/{rel}", text + ("import os; os.system('echo pwned')\n" if rel == "a.py" else ""))
    return path


@pytest.mark.parametrize("bad", ["", None, "not-a-hash", "A" * 64, "0" * 63])
def test_a_pin_without_a_wellformed_sha256_is_refused_before_anything_is_written(env, bad):
    root = env["root"]
    tamper_release(env)
    pin = json.loads((root / "upstream.json").read_text())
    (root / "upstream.json").write_text(json.dumps({**pin, "sha256": bad}))
    cli(env, "verify")  # copies the tool in before the snapshot
    before = snapshot(root)
    for args in (("materialize",), ("materialize", "--force")):
        one_line_error(cli(env, *args), "upstream.json", "sha256")
        assert snapshot(root) == before  # the tampered file is not laid down, nothing else is written
    one_line_error(cli(env, "verify"), "sha256")
    with pytest.raises(release.ForkError, match="sha256"):
        tree.materialize(root, log=lambda m: None)  # what setup.py runs
    with pytest.raises(release.ForkError, match="sha256"):
        release.fetch(root, "1.0.0", "diffusers-1.0.0-py3-none-any.whl", bad)


EVIL = "Description: evil\n\n--- /dev/null\n+++ b/{path}\n@@ -0,0 +1,2 @@\n+#!/bin/sh\n+echo pwned\n"


@pytest.mark.parametrize("path", ["src/diffusers/../../.git/hooks/post-checkout", "{tmp}/evil-hook",
                                  "src/diffusers/..\\..\\x.py", "setup.py", "src/diffusers/./a.py",
                                  "src/diffusers/evil\x01.py"])
def test_a_patch_may_not_touch_a_path_outside_the_package(env, path, tmp_path):
    root = env["root"]
    (root / "patches" / "0003-evil.patch").write_text(EVIL.format(path=path.format(tmp=tmp_path)))
    with (root / "patches" / "series").open("a") as f:
        f.write("0003-evil.patch\n")
    hook = root / ".git" / "hooks" / "post-checkout"
    one_line_error(cli(env, "materialize"), "0003-evil.patch", "refused")
    assert not hook.exists() and not (root / "setup.py").exists() and not (tmp_path / "evil-hook").exists()
    res = cli(env, "verify")
    assert res.returncode == 1 and "0003-evil.patch" in res.stdout and "refused" in res.stdout
    one_line_error(cli(env, "refresh"), "0003-evil.patch")
    assert not hook.exists()


def test_a_symlink_may_not_lead_a_write_out_of_the_package(env, tmp_path):
    root, outside = env["root"], tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("not yours\n")
    (root / "src/diffusers/b.py").unlink()
    (root / "src/diffusers/b.py").symlink_to(outside / "target.txt")  # a laid-down file, now a link out
    one_line_error(cli(env, "materialize", "--force"), "b.py", "outside")
    assert (outside / "target.txt").read_text() == "not yours\n"
    (root / "src/diffusers/b.py").unlink()
    (root / "src/diffusers/evil").symlink_to(outside, target_is_directory=True)  # a folder, linked out
    (root / "patches" / "0003-evil.patch").write_text(EVIL.format(path="src/diffusers/evil/x.py"))
    with (root / "patches" / "series").open("a") as f:
        f.write("0003-evil.patch\n")
    one_line_error(cli(env, "materialize", "--force"), "evil/x.py", "outside")
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]


@pytest.mark.parametrize("name", ["../../x.patch", "../x.patch", "{tmp}/x.patch", "sub/0003-x.patch", "0003-x.txt",
                                  ".0003-x.patch", "0003-X Y.patch"])
def test_patch_names_are_plain_names_inside_patches(env, name, tmp_path):
    root, name = env["root"], name.format(tmp=tmp_path)
    (root / "src/diffusers/__init__.py").write_text(INIT + "# an edit\n")
    series = (root / "patches" / "series").read_text()
    one_line_error(cli(env, "refresh", "--patch", name), "--patch", "NNNN-topic.patch")
    assert (root / "patches" / "series").read_text() == series
    assert sorted(p.name for p in tmp_path.rglob("x.patch")) == []
    (root / "patches" / "series").write_text(series + name + "\n")  # a series entry is held to the same
    one_line_error(cli(env, "materialize"), "patches/series")
    res = cli(env, "verify")
    assert res.returncode == 1 and "patches/series entry" in res.stdout


def test_a_patch_that_is_not_utf8_is_named(env):
    root = env["root"]
    patch = root / "patches" / "0002-late-line.patch"
    patch.write_bytes(patch.read_bytes().replace(b"x25 = -25", b"x25 = -25 \xff\xfe"))
    for args in (("materialize",), ("refresh",)):
        one_line_error(cli(env, *args), "patches/0002-late-line.patch", "not UTF-8")
    res = cli(env, "verify")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "0002-late-line.patch: patches/0002-late-line.patch: not UTF-8 text" in res.stdout
    patch.write_bytes(b"\xff" + patch.read_bytes())
    git(root, "commit", "-qam", "a patch that is not UTF-8")
    one_line_error(cli(env, "rebase", "1.1.0", "--no-tests"), "0002-late-line.patch", "not UTF-8")


@pytest.mark.parametrize("rel", ["_fork_version.py", ".gitignore", ".upstream-manifest.json"])
def test_verify_checks_the_generated_files(env, rel):
    root = env["root"]
    path = root / "src/diffusers" / rel
    path.write_text(path.read_text() + ("import os; os.system('echo pwned')\n" if rel.endswith(".py") else " "))
    res = cli(env, "verify")
    assert res.returncode == 1 and f"src/diffusers/{rel}: not what materialize generates" in res.stdout
    assert cli(env, "materialize", "--force").returncode == 0
    assert cli(env, "verify").returncode == 0 and "pwned" not in path.read_text()


def test_materialize_and_refresh_write_nothing_when_nothing_changed(env):
    root = env["root"]
    files = [p for p in (root / "src").rglob("*") if p.is_file()] + [root / "PATCHES.md", root / "patches/series"]
    for p in files:
        os.utime(p, ns=(10**9, 10**9))  # long ago: any rewrite shows
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert tree.materialize(root, log=lambda m: None)["changed"] == 0
    tree.refresh(root, log=lambda m: None)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stats
    if os.geteuid():  # a read-only tree with nothing to change (root writes anyway: the stats above hold it)
        for p in [*files, *(q for q in (root / "src").rglob("*") if q.is_dir())]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            assert tree.materialize(root, log=lambda m: None)["changed"] == 0
        finally:
            for p in (root / "src").rglob("*"):
                p.chmod(p.stat().st_mode | 0o200)


def wait_for(check, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_one_fork_command_at_a_time(env, capsys, monkeypatch):
    root = env["root"]
    cli(env, "verify")  # copies the tool in before the snapshot
    before = snapshot(root)
    lock = root / ".fork.lock"
    first = cli(env, "rebase", "1.1.0", "--test-cmd", f"{PY} -c 'import time; time.sleep(60)'", popen=True)
    try:
        wait_for(lambda: (root / ".rebase" / "state.json").is_file() and (root / ".rebase" / "backup").is_dir(),
                 "the first rebase to reach its tests")
        monkeypatch.setenv("DIFFUSERS_FLASH_LOCK_WAIT", "0.2")
        for args in (["1.2.0"], ["--abort"], ["--continue"]):
            assert rebase(env, *args) == 2
            err = capsys.readouterr().err
            assert f"pid {first.pid}: fork.py rebase 1.1.0" in err and len(err.strip().splitlines()) == 1, err
        with pytest.raises(release.ForkError, match=f"pid {first.pid}"):
            tree.materialize(root, log=lambda m: None)  # what setup.py runs
        with pytest.raises(release.ForkError, match=f"pid {first.pid}"):
            tree.refresh(root, log=lambda m: None)
        assert tree.verify(root) is not None  # reading needs no lock
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first dies holding the lock, its rebase half done
        first.communicate()
    assert rebase(env, "--abort") == 0  # a dead holder's lock does not block
    assert snapshot(root) == before and not lock.exists()


@pytest.mark.parametrize("target, mark", [("1.3.0", '"fingerprint"'), ("1.1.0", '"finished": true')])
def test_a_kill_while_the_rebase_state_is_written_leaves_a_state_abort_recovers(env, target, mark):
    root = env["root"]
    cli(env, "verify")
    before = snapshot(root)
    res = cli(env, "rebase", target, "--no-tests", kill_at=mark)
    assert res.returncode == -signal.SIGKILL, res.stderr  # killed halfway through writing .rebase/state.json
    state = root / ".rebase" / "state.json"
    assert not state.exists() or json.loads(state.read_text())  # the old state or none, never half of one
    res = cli(env, "rebase", "--continue")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    res = cli(env, "verify")
    assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res.stderr
    assert cli(env, "rebase", "--abort").returncode == 0
    assert snapshot(root) == before and not (root / ".rebase").exists()
    assert cli(env, "verify").returncode == 0


def test_a_kill_while_the_manifest_is_written_leaves_it_whole(env):
    root = env["root"]
    (root / "patches" / "series").write_text("0001-ours-in-a.patch\n")  # 0002 dropped: the manifest changes
    (root / "patches" / "0002-late-line.patch").unlink()
    tree.write_patches_doc(root)
    res = cli(env, "materialize", kill_at='"upstream"')
    assert res.returncode == -signal.SIGKILL, res.stderr
    json.loads((root / "src/diffusers/.upstream-manifest.json").read_text())  # whole: the old one
    res = cli(env, "verify")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert cli(env, "materialize").returncode == 0 and cli(env, "verify").returncode == 0


def test_a_damaged_manifest_says_how_to_recover(env):
    root = env["root"]
    man = root / "src/diffusers/.upstream-manifest.json"
    man.write_text(man.read_text()[:40])  # as a kill mid-write left it before writes were atomic
    res = cli(env, "verify")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert ".upstream-manifest.json is damaged" in res.stdout and "materialize --force" in res.stdout
    for args in (("materialize",), ("refresh",)):
        one_line_error(cli(env, *args), ".upstream-manifest.json is damaged", "materialize --force")
    man.write_text(json.dumps({"upstream": "1.0.0", "files": {"src/diffusers/../../x": "0" * 64}}))
    one_line_error(cli(env, "materialize"), "damaged")
    assert cli(env, "materialize", "--force").returncode == 0  # the way out it names
    assert cli(env, "verify").returncode == 0


@pytest.mark.parametrize("finished", [False, True])
def test_a_damaged_rebase_state_says_how_to_recover(env, finished):
    root = env["root"]
    cli(env, "verify")
    before = snapshot(root)
    if finished:  # the rebase went through, its tests failed: the new tree is in place, the state says so
        assert cli(env, "rebase", "1.1.0", "--test-cmd", f"{PY} -c 'raise SystemExit(3)'").returncode == 1
    else:
        assert cli(env, "rebase", "1.3.0").returncode == 1
    state = root / ".rebase" / "state.json"
    state.write_text(state.read_text()[:50])
    one_line_error(cli(env, "rebase", "--continue"), ".rebase/state.json is damaged", "rebase --abort")
    assert cli(env, "rebase", "--abort").returncode == 0  # the way out it names
    assert snapshot(root) == before and not (root / ".rebase").exists()
    assert cli(env, "verify").returncode == 0


# ---------------------------------------------------------------- round 3: nothing lost, nothing followed (issue 32)
def restart(env, before):
    """Back to the committed project on 1.0.0 after a rebase that went through."""
    root = env["root"]
    git(root, "checkout", "-q", "--", ".")
    git(root, "clean", "-fdq", "--", "patches")
    assert cli(env, "materialize", "--force").returncode == 0
    assert snapshot(root) == before


@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_kill_during_the_final_clean_up_loses_no_tracked_file(env, n):
    root = env["root"]
    cli(env, "verify")
    before = snapshot(root)
    assert cli(env, "rebase", "1.1.0", "--no-tests").returncode == 0
    after = snapshot(root)
    restart(env, before)
    res = cli(env, "rebase", "1.1.0", "--no-tests", kill_unlink=n)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr  # killed while .rebase/ is deleted
    res = cli(env, "rebase", "--abort")
    assert "Traceback" not in res.stderr, res.stderr
    now = snapshot(root)
    assert now in (before, after), sorted(set(before) ^ set(now))
    assert cli(env, "verify").returncode == 0
    assert cli(env, "rebase", "1.2.0", "--no-tests").returncode == (0 if now == before else 2)  # dirty if after


@pytest.mark.parametrize("damage", ["no backup", "backup lacks a patch", "backup lacks a patch, no state"])
def test_abort_never_deletes_what_it_cannot_restore(env, damage):
    root = env["root"]
    cli(env, "verify")
    assert cli(env, "rebase", "1.1.0", "--test-cmd", f"{PY} -c 'raise SystemExit(3)'").returncode == 1
    after = snapshot(root)
    backup = root / ".rebase" / "backup"
    if damage == "no backup":
        shutil.rmtree(backup)
    else:
        (backup / "patches" / "0002-late-line.patch").unlink()
    if damage.endswith("no state"):
        (root / ".rebase" / "state.json").unlink()
    one_line_error(cli(env, "rebase", "--abort"), "backup", "nothing")
    assert snapshot(root) == after  # every tracked file as the rebase left it


def test_a_planted_lock_symlink_or_hard_link_is_never_written_through(env, tmp_path):
    root, victim, lock = env["root"], tmp_path / "victim.txt", env["root"] / ".fork.lock"
    victim.write_text("precious\n")
    for plant in ("symlink", "dangling symlink", "hard link"):
        if lock.is_symlink() or lock.exists():
            lock.unlink()
        if plant == "symlink":
            lock.symlink_to(victim)
        elif plant == "dangling symlink":
            lock.symlink_to(tmp_path / "created-by-the-lock")
        else:
            os.link(victim, lock)
        one_line_error(cli(env, "materialize"), ".fork.lock")
        with pytest.raises(release.ForkError, match="fork.lock"):
            tree.materialize(root, log=lambda m: None)  # what setup.py runs
        assert victim.read_text() == "precious\n" and not (tmp_path / "created-by-the-lock").exists(), plant
    lock.unlink()
    assert cli(env, "materialize").returncode == 0 and victim.read_text() == "precious\n"


def test_verify_reports_every_stray_file_and_refuses_symlinks(env, tmp_path):
    root = env["root"]
    assert cli(env, "verify").returncode == 0
    extra = root / "src" / "diffusers" / "models" / "extra.py"  # neither laid down, generated nor ours
    extra.parent.mkdir()
    extra.write_text("x = 1\n")
    res = cli(env, "verify")
    assert res.returncode == 1 and "src/diffusers/models/extra.py" in res.stdout and "OK" not in res.stdout
    shutil.rmtree(extra.parent)
    assert cli(env, "verify").returncode == 0
    laid_b = root / "src" / "diffusers" / "b.py"  # a laid-down file, now a link to a copy out of the tree
    (tmp_path / "b.py").write_bytes(laid_b.read_bytes())
    laid_b.unlink()
    laid_b.symlink_to(tmp_path / "b.py")
    res = cli(env, "verify")
    assert res.returncode == 1 and "src/diffusers/b.py" in res.stdout and "symlink" in res.stdout, res.stdout
    laid_b.unlink()
    (root / "src" / "diffusers" / "sub").symlink_to(tmp_path, target_is_directory=True)  # a folder linked out
    res = cli(env, "verify")
    assert res.returncode == 1 and "src/diffusers/sub" in res.stdout and "symlink" in res.stdout, res.stdout


@pytest.mark.parametrize("finished", [False, True])
def test_a_state_with_wrong_types_gets_one_line_and_abort_recovers(env, finished):
    root = env["root"]
    cli(env, "verify")
    before = snapshot(root)
    if finished:
        assert cli(env, "rebase", "1.1.0", "--test-cmd", f"{PY} -c 'raise SystemExit(3)'").returncode == 1
    else:
        assert cli(env, "rebase", "1.3.0").returncode == 1
    state = root / ".rebase" / "state.json"
    st = {k: None for k in json.loads(state.read_text())}
    state.write_text(json.dumps({**st, "old_pin": "1.0.0"}))
    one_line_error(cli(env, "rebase", "--continue"), ".rebase/state.json is damaged", "rebase --abort")
    res = cli(env, "rebase", "--abort")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert snapshot(root) == before and not (root / ".rebase").exists()


# ---------------------------------------------------------------- a rebase that talks (issue 33)
def test_rebase_says_what_it_does_and_the_tests_show_their_progress(env):
    cmd = f"{PY} -c \"print('progress-of-the-tests-f9', flush=True)\""
    res = cli(env, "rebase", "1.1.0", "--test-cmd", cmd)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for stage in ("reading diffusers 1.1.0", "writing the rebased series", "verify: OK", "import: ok",
                  "running the tests", "--no-tests", "progress-of-the-tests-f9", "tests: passed"):
        assert stage in out, (stage, out)
    assert out.index("running the tests") < out.index("progress-of-the-tests-f9") < out.index("tests: passed")
    assert "not committed" in out and "refuses" in out  # the changes are left to commit


def test_the_test_run_is_announced_with_its_expected_length(env, tmp_path):
    root = env["root"]
    options = {"tests": True, "test_cmd": None}
    assert rebase_tool.tests_announcement(root, options) is None  # no tests/ folder: nothing runs
    (root / "tests").mkdir()
    text = rebase_tool.tests_announcement(root, options)
    assert "about 10 min" in text and "--no-tests" in text and "Ctrl-C" in text, text
    rebase_tool.record_test_time(root, rebase_tool.tests_command(root, options), 450.0)
    assert "the last run here took 7.5 min" in rebase_tool.tests_announcement(root, options)
    text = rebase_tool.tests_announcement(root, {"tests": True, "test_cmd": "make check"})
    assert "make check" in text and "--no-tests" in text


def test_ctrl_c_during_the_tests_gives_one_line_and_continue_finishes(env, tmp_path):
    root, started = env["root"], tmp_path / "tests-started"
    cli(env, "verify")
    cmd = f"{PY} -c \"import pathlib, time; pathlib.Path('{started}').touch(); time.sleep(600)\""
    first = cli(env, "rebase", "1.1.0", "--test-cmd", cmd, popen=True)
    try:
        wait_for(started.exists, "the tests to start")
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C sends: the terminal's foreground process group
        out, err = first.communicate(timeout=60)  # the test command sleeps 600 s: Ctrl-C must stop it
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, (first.returncode, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and "rebase --continue" in err and "rebase --abort" in err, err
    assert "1.1.0" in err and "in place" in err
    res = cli(env, "rebase", "--continue", "--no-tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "finished already" not in res.stdout + res.stderr and "verify: OK" in res.stdout
    assert "tests: not run" in res.stdout
    assert not (root / ".rebase").exists() and release.load_pin(root)["version"] == "1.1.0"
    assert cli(env, "verify").returncode == 0


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage", ["replay", "writing", "checks"])
def test_ctrl_c_at_each_stage_says_what_happened_and_leaves_what_abort_or_continue_takes(env, capsys, monkeypatch,
                                                                                         stage):
    root = env["root"]
    before = snapshot(root)
    target = {"replay": (rebase_tool, "replay"), "writing": (release, "save_pin"), "checks": (tree, "verify")}[stage]
    with monkeypatch.context() as patched:
        patched.setattr(*target, _interrupt)
        try:
            code = rebase(env, "1.1.0", "--no-tests")
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C gave a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    if stage == "replay":
        assert "nothing outside .rebase/ changed" in err and snapshot(root) == before
        assert rebase(env, "1.1.0", "--no-tests") == 0  # simply start again
    elif stage == "writing":
        assert "while writing" in err and "rebase --abort" in err
        assert rebase(env, "--continue") == 2
        assert "rebase --abort" in capsys.readouterr().err
        assert rebase(env, "--abort") == 0 and snapshot(root) == before
    else:
        assert "in place" in err and "rebase --continue" in err
        assert rebase(env, "--continue", "--no-tests") == 0
        assert "verify: OK" in capsys.readouterr().out and not (root / ".rebase").exists()


# ---------------------------------------------------------------- the import check (issue 29)
def test_the_import_check_imports_every_pipeline_class_the_release_exports(tmp_path):
    pkg = tmp_path / "src" / "diffusers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "__all__ = ['GoodPipeline', 'HttpxPipeline', 'BrokenPipeline', 'helper']\n"
        "from .good import GoodPipeline\n\n\n"
        "def helper():\n    return 1\n\n\n"
        "def __getattr__(name):\n"
        "    if name == 'HttpxPipeline':\n        import httpx_not_installed_f9  # noqa\n"
        "    if name == 'BrokenPipeline':\n        raise RuntimeError('broken on purpose')\n"
        "    raise AttributeError(name)\n")
    (pkg / "good.py").write_text("class GoodPipeline:\n    pass\n")
    cell = rebase_tool.import_check(tmp_path / "src")
    assert cell.startswith("FAIL: 2 of 3 pipeline classes"), cell
    assert "HttpxPipeline: ModuleNotFoundError: No module named 'httpx_not_installed_f9'" in cell, cell
    assert "BrokenPipeline: RuntimeError: broken on purpose" in cell, cell
    result = rebase_tool.import_pipelines(tmp_path / "src")
    block = rebase_tool.import_lines(result)
    assert block[0].startswith("import: FAILED: 2 of 3 pipeline classes")
    assert "  1 only for want of the module `httpx_not_installed_f9`" in block[1], block
    # the release's own requirements known: a package it does not require, absent here, is no failure of ours
    # (pristine fails the same; e.g. ftfy for SkyReelsV2 at 0.35-0.36); one it requires still fails
    cell = rebase_tool.import_check(tmp_path / "src", required={"numpy"})
    assert cell.startswith("FAIL: 1 of 3 pipeline classes") and "HttpxPipeline" not in cell, cell
    result = rebase_tool.import_pipelines(tmp_path / "src", required={"numpy"})
    assert result["missing"] == {"HttpxPipeline": "httpx_not_installed_f9"}
    cell = rebase_tool.import_check(tmp_path / "src", required={"httpx-not-installed-f9"})
    assert cell.startswith("FAIL: 2 of 3 pipeline classes"), cell
    # a module the release requires and this environment lacks: said once, the classes it stops not listed
    block = rebase_tool.import_lines(rebase_tool.import_pipelines(tmp_path / "src", {"httpx-not-installed-f9"}))
    assert block[1].startswith("  1 only for want of the module `httpx_not_installed_f9`, not installed here"), block
    assert "rebase --continue" in block[1] and not any(line.startswith("  HttpxPipeline") for line in block)
    assert "  BrokenPipeline: RuntimeError: broken on purpose" in block and len(block) == 3, block
    (pkg / "__init__.py").write_text("__all__ = ['GoodPipeline', 'HttpxPipeline']\nfrom .good import GoodPipeline\n"
                                     "def __getattr__(name):\n    import httpx_not_installed_f9  # noqa\n")
    assert rebase_tool.import_check(tmp_path / "src", required=set()) == (
        "ok (2 pipeline classes; 1 need packages not installed here: httpx_not_installed_f9 (1))")
    assert rebase_tool.import_lines(rebase_tool.import_pipelines(tmp_path / "src", set())) == [
        "import: ok: diffusers and its 2 pipeline classes; 1 need packages not installed here: "
        "httpx_not_installed_f9 (1)"]
    (pkg / "__init__.py").write_text("__all__ = ['GoodPipeline']\nfrom .good import GoodPipeline\n")
    assert rebase_tool.import_check(tmp_path / "src") == "ok (1 pipeline class)"


def test_the_release_requirements_are_read_from_its_file(tmp_path, monkeypatch):
    from forklib import build

    meta = ("Metadata-Version: 2.1\nName: diffusers\nRequires-Dist: httpx<1.0.0\nRequires-Dist: Pillow\n"
            "Requires-Dist: ftfy; extra == \"test\"\n\n")
    monkeypatch.setattr(rebase_tool.release, "fetch", lambda *a, **k: tmp_path / "x.whl")
    monkeypatch.setattr(build, "metadata", lambda path: (meta, None))
    target = {"source": "pypi", "version": "0.36.0", "file": "x.whl", "sha256": "0" * 64}
    assert rebase_tool.required_packages(tmp_path, target) == {"httpx", "pillow"}
    assert rebase_tool.required_packages(tmp_path, {**target, "source": "git"}) is None


def test_a_variant_whose_last_change_came_in_a_merge_keeps_its_name(tmp_path):
    """The rebase back names a kept text after the variant file that held those bytes in the project's
    history, also where those bytes first appeared in a merge commit (a branch's variant merged with a
    change of main's): else a round trip renames the file (0.37.1.patch serving 0.36.0 came back as
    0.36.0.patch)."""
    root = tmp_path / "p"
    folder = root / "patches" / "variants" / "0005-x"
    folder.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (folder / "0.37.1.patch").write_text("Applies-To: 0.36.0..0.37.1\nold\n\n\nbase\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a variant")
    git(root, "checkout", "-qb", "side")
    (folder / "0.37.1.patch").write_text("Applies-To: 0.36.0..0.37.1\nold\n\n\nbase\nside\n")
    git(root, "commit", "-qam", "side")
    git(root, "checkout", "-q", "main")
    (folder / "0.37.1.patch").write_text("Applies-To: 0.36.0..0.37.1\nmain\nold\n\n\nbase\n")
    git(root, "commit", "-qam", "main")
    git(root, "merge", "-q", "side", "-m", "merge")
    merged = (folder / "0.37.1.patch").read_text()
    assert merged.startswith("Applies-To: 0.36.0..0.37.1\nmain\n") and merged.endswith("side\n"), merged
    (folder / "0.37.1.patch").unlink()
    git(root, "commit", "-qam", "rebased: the variant became the main text")
    assert rebase_tool.history_label(root, "0005-x.patch", merged) == "0.37.1"
    assert rebase_tool.history_label(root, "0005-x.patch", merged + "other\n") is None
