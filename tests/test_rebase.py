"""fork.py rebase on synthetic upstreams: tiny wheels and git tags made here, a fake index served
from a file:// URL, a fake project root in a temporary git repository. Offline; the real
checkout's files are never touched."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
_spec = importlib.util.spec_from_file_location("fork_cli", SCRIPTS / "fork.py")
fork = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fork)

from forklib import release, tree  # noqa: E402

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
PY = sys.executable
PATCHED_10 = "from .ours import f; x10 = f(10)\n"


def a_py(edits=None, prepend=0):
    lines = [f"x{i} = {i}\n" for i in range(1, 31)]
    for n, text in (edits or {}).items():
        lines[n - 1] = text
    return "".join([f"# upstream header line {k}\n" for k in range(prepend)] + lines)


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
}


def files_of(version):
    files = {"__init__.py": INIT, "b.py": B_PY, **RELEASES[version]}
    return {rel: text for rel, text in files.items() if text is not None}


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(cwd, *args):
    return subprocess.run([*GIT, "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


def snapshot(root):
    """Every file of the project except git's and the work folder's, byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".rebase", "__pycache__"} & set(p.relative_to(root).parts)}


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
    tree.write(root, "src/diffusers/ours.py", "def f(x):\n    return x\n")
    git(root, "add", "-A")
    tree.materialize(root, log=lambda m: None)
    make_patch(root, "0001-ours-in-a.patch", {"a.py": a_py({10: PATCHED_10}), "b.py": B_PY.replace("return 1", "return -1")})
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
    pin = release.load_pin(env["root"])
    assert (pin["version"], pin["tag"], pin["file"]) == ("1.1.0", "v1.1.0", "diffusers-1.1.0-py3-none-any.whl")
    assert pin["sha256"] == env["published"]["1.1.0"][0]["digests"]["sha256"]
    assert list(pin) == ["package", "version", "file", "sha256", "tag", "repo", "fork_release"]  # 1.0.0's commit dropped
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
    assert "three-way" in capsys.readouterr().out
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
    resolved = a_py({10: "from .ours import f; x10 = f(10)  # upstream edit\n"})
    work_a.write_text(resolved)
    assert rebase(env, "--continue") == 0
    assert laid(env, "a.py") == resolved.replace("x25 = 25\n", "x25 = -25\n")
    assert release.load_pin(env["root"])["version"] == "1.3.0"
    assert field(env, "0001-ours-in-a.patch", "Applies-To") == "1.3.0"  # changed by hand: 1.0.0 has its variant
    assert field(env, "0002-late-line.patch", "Applies-To") == "1.0.0"  # applied unchanged: left byte for byte
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
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| 1.")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.mark.parametrize("source", ["index", "git"])
def test_check_table(env, capsys, source):
    before = snapshot(env["root"])
    extra = ["--upstream-repo", str(env["upstream"])] if source == "git" else []
    assert rebase(env, "--check", "1.0.0..1.6.0", *extra) == 1  # 1.3.0 and 1.5.0 conflict
    rows = expected_rows(capsys.readouterr().out)
    assert [rows[v][0] for v in RELEASES if v != "1.7.0"] == ["clean", "offsets", "three-way", "conflict", "clean", "conflict", "clean"]
    assert rows["1.6.0"][1] == "0001 (upstream moved b.py -> sub/b.py)"
    assert rows["1.5.0"][1] == "0001-ours-in-a.patch: b.py (gone upstream)"
    assert rows["1.1.0"][1] == "offsets: 0001 x1, 0002 x1"
    assert rows["1.2.0"][1] == "0001 three-way: a.py hunk 1"
    assert rows["1.3.0"][1] == "0001-ours-in-a.patch: a.py"
    assert rows["1.3.0"][2] == "0002 clean" and rows["1.2.0"][2] == "-"  # how the later patches fare
    assert rows["1.0.0"][3] == "ok" and rows["1.3.0"][3] == "-"
    assert rows["1.4.0"][3] == "FAIL: ImportError: broken 1.4.0"
    assert rows["1.0.0"][4] == "not run"
    assert snapshot(env["root"]) == before and not (env["root"] / ".rebase").exists()


def test_check_runs_tests_on_each_release_when_asked(env, capsys):
    # passes only where the patched tree of 1.1.0 (its header lines, our x25) is the one imported
    cmd = f"{PY} -c 'import inspect, diffusers.a as a; assert a.x25 == -25 and \"# upstream header\" in inspect.getsource(a)'"
    assert rebase(env, "--check", "1.1.0", "1.2.0", "--tests", "--test-cmd", cmd) == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][4] == "pass" and rows["1.2.0"][4].startswith("FAIL")


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
    new = {"src/diffusers/p/pipeline_onnx_x.py": B_PY + "\n# new upstream line\n", "src/diffusers/p/other.py": "y = 1\n"}
    assert rebase.moved_to("src/diffusers/p/pipeline_x_onnx.py", B_PY, new, old) == "src/diffusers/p/pipeline_onnx_x.py"
    assert rebase.moved_to("src/diffusers/p/pipeline_x_onnx.py", B_PY, {"src/diffusers/q.py": "z = 2\n"}, old) is None


# ---------------------------------------------------------------- series variants
RESOLVED_1_3 = a_py({10: "from .ours import f; x10 = f(10)  # upstream edit\n"})


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
    assert b"Variant for 1.0.0: `patches/variants/0001-ours-in-a/1.0.0.patch`" in on_1_3["PATCHES.md"]
    git(env["root"], "commit", "-qam", "on 1.3.0")
    git(env["root"], "add", "-A")
    git(env["root"], "commit", "-qm", "variants")
    assert rebase(env, "1.0.0", *repo) == 0
    assert "from patches/variants/0001-ours-in-a/1.0.0.patch" in capsys.readouterr().out
    assert snapshot(env["root"]) == before  # series, patches, variants, PATCHES.md, pin and laid-down tree


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
    assert "-x10 = 10  # upstream edit" in (env["root"] / ".rebase" / "tree" / "src" / "diffusers" / "a.py.rej").read_text()
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
    tree.write(env["root"], "src/diffusers/b.py", B_PY.replace("return 1", "return -1").replace("return 2", "return -2"))
    said = []
    tree.refresh(env["root"], log=said.append)
    assert any(m.startswith("warning: 0001-ours-in-a.patch has variants (variants/0001-ours-in-a/1.3.0.patch)")
               for m in said)


# ---------------------------------------------------------------- Upstream-Since: patches upstream has
def upstream_since(env, name, version, doc=True):
    """Declare in ``name``'s header that upstream has its change from ``version`` on; commit."""
    path = env["root"] / "patches" / name
    text = re.sub(r"\nUpstream-Since: .*", "", path.read_text(), count=1)
    path.write_text(text.replace("\nApplies-To:", f"\nUpstream-Since: {version}\nApplies-To:", 1))
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
    assert "Upstream since: 1.7.0" in (env["root"] / "PATCHES.md").read_text()
    assert rebase(env, "--check", "1.1.0", "1.7.0", "--no-import") == 0
    rows = expected_rows(capsys.readouterr().out)
    assert rows["1.1.0"][:2] == ["offsets", "offsets: 0001 x1, 0002 x1"]  # before the release: applied
    assert rows["1.7.0"][:2] == ["clean", "0002 upstream since 1.7.0"]  # from it on: skipped


def test_round_trip_past_upstream_since_is_byte_identical(env, capsys):
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


def test_verify_checks_upstream_since(env):
    upstream_since(env, "0002-late-line.patch", "1.7.0")
    add_variant(env, "0001-ours-in-a.patch", "1.3.0", "1.3.0", RESOLVED_1_3)
    assert tree.verify(env["root"]) == []
    upstream_since(env, "0001-ours-in-a.patch", "2.0")  # the main patch says so, its variant does not
    problems = tree.verify(env["root"])
    assert any("0001-ours-in-a/1.3.0.patch: Upstream-Since (none) but 0001-ours-in-a.patch says 2.0" in p
               for p in problems)
    upstream_since(env, "0002-late-line.patch", "soon", doc=False)
    assert any("Upstream-Since: 'soon' is not a release version" in p for p in tree.verify(env["root"]))
