"""fork.py rebase: move the patch series onto another upstream release, or check it against several.

Each patch is re-applied to the new release in turn. A hunk whose lines match exactly applies
there (at its line: "clean", or elsewhere: "offset"). Where one does not, the file is merged
three ways with ``git merge-file``: base = the file before the patch on the old release, ours =
after it, theirs = the file before the patch on the new release, so a change whose context
upstream moved or edited still lands ("three-way"). Where that merge conflicts (most often a line of
ours beside a line upstream reflowed), the hunk may drop up to 3 context lines at one end and must
then match at one single place ("fuzz", as GNU patch; always reported, and the rewritten patch has
zero fuzz again). A file upstream moved or renamed is followed. The first patch that still conflicts stops
the rebase: its files (conflict markers, or a .rej where there is no file to merge into) are left
in .rebase/tree/, and nothing outside .rebase/ changes. ``--continue`` takes the resolution from
there; ``--abort`` throws the attempt away (and restores the old tree if a rebase had finished).

A patch with a variant for the target release (patches/variants/<patch>/<release>.patch, chosen by
its Applies-To; see variants.py) is applied from that variant instead. A patch whose header says
``Applied-Upstream: X`` (DEP-3; ``Upstream-Since: X`` in older files) is not applied on X or later
("upstream since X"): it stays in the series, byte for byte, for the releases before X, where a rebase
back applies it again. A patch whose header says ``Applies-From: X`` changes code upstream added in X: it is
not applied on releases before X ("from X"); on those its main text is its text for the newest release it
serves (a rebase back there restores it), and from X on its variants serve as for any patch.

When every patch applies, the new tree is laid down, the patches are rewritten with zero fuzz
against the new release (Applies-To and Last-Update updated), each replaced text the rebase back could
not make again is kept as the variant for the old release, the pin and PATCHES.md follow, and the
checks run: ``verify``, the import of every pipeline class the release exports, and the project's
tests (about 10 minutes on 2 CPU cores, their progress shown; ``--no-tests`` skips them). The result is
left uncommitted: review ``git diff`` and commit it (the next rebase refuses a dirty tree).

Ctrl-C at any stage prints one line saying what it left: nothing changed (start again), a rebase
still stopped at its conflict, a series half written (``--abort``), or the rebased tree in place with
its checks unfinished (``--continue`` runs them again, ``--continue --no-tests`` without the tests).
"""
from __future__ import annotations

import codecs
import contextlib
import datetime
import difflib
import email.parser
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import fsutil, patchfile, release, tree, variants
from .fsutil import Interrupted
from .release import PREFIX, ForkError
from .variants import vkey

WORK = ".rebase"
RANK = ["clean", "offsets", "three-way", "fuzz", "resolved", "empty", "conflict"]
HOW = {"clean": "clean", "offset": "offsets", "three-way": "three-way", "fuzz": "fuzz", "conflict": "conflict"}
_VERSION = re.compile(r"(v?)(\d+(?:\.\d+)+(?:(?:a|b|rc|\.post|\.dev)\d+)?)")
_FINAL = re.compile(r"v?\d+\.\d+\.\d+")


# ---------------------------------------------------------------- the target release
def parse_target(text: str) -> tuple[str, str]:
    """(version, tag) from ``0.5.1`` or ``v0.5.1``."""
    m = _VERSION.fullmatch(text.strip())
    if not m:
        raise ForkError(f"{text!r} is not a release version or tag (expected e.g. 0.5.1 or v0.5.1)")
    return m.group(2), text.strip() if m.group(1) else "v" + m.group(2)


wheel_name = release.wheel_name


def upstream_repo(root: Path, spec: str | None) -> str | None:
    """A local git directory for --upstream-repo: the path itself, or a bare clone of a URL in the cache."""
    if not spec:
        return None
    if Path(spec).exists():
        release.git_tags(spec)  # says so if it is not a git repository
        return spec
    if "://" not in spec and not spec.startswith("git@"):
        raise ForkError(f"--upstream-repo {spec}: no such directory (and not a URL)")
    dest = release.cache_dir(root) / ("git-" + hashlib.sha256(spec.encode()).hexdigest()[:12])
    cmd = (["git", "-C", str(dest), "fetch", "--quiet", "--tags", "--force", spec] if dest.exists()
           else ["git", "clone", "--quiet", "--bare", spec, str(dest)])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise ForkError(f"--upstream-repo {spec}: {' '.join(cmd[:3])} failed: {res.stderr.strip()}")
    return str(dest)


def resolve(root: Path, text: str, repo: str | None, for_pin: bool) -> dict:
    """The target release as a pin-like dict. ``for_pin``: the release file and its index sha256 are
    needed (the build lays the tree down from that file), even when the files come from git."""
    version, tag = parse_target(text)
    t = {"version": version, "file": wheel_name(version), "sha256": None, "tag": tag, "source": "pypi"}
    if repo:
        tags = set(release.git_tags(repo))
        t["tag"] = next((c for c in (tag, "v" + version, version) if c in tags), None)
        if t["tag"] is None:
            raise ForkError(f"{repo}: no tag {tag} (nor {version})")
        t.update(source="git", repo=repo, commit=release.git_commit(repo, t["tag"]))
    if repo is None or for_pin:  # the wheel, else the source archive: checked against the index's sha256
        try:
            t["file"], t["sha256"] = release.release_file(version)
        except ForkError as e:
            raise ForkError(f"{e}" + ("" if repo else " (--upstream-repo reads a git tag instead, for --check)")) \
                from None
    if for_pin and not t.get("commit"):  # from the index: the commit a pin of this release had, if one was committed
        t["commit"] = release.committed_commit(root, t)
    return t


def target_files(root: Path, t: dict) -> dict:
    """The target release's files (``src/diffusers/...`` -> text), the release file checked against the index."""
    if t["source"] == "git":
        return release.read_git_tag(t["repo"], t["tag"])
    path = release.fetch(root, t["version"], t["file"], t["sha256"], "the sha256 the index publishes")
    return release.read_release(path)


def same_as_release(root: Path, t: dict, files: dict) -> None:
    """Refuse a git tag whose files differ from the release file the build will lay down."""
    wheel = release.read_release(release.fetch(root, t["version"], t["file"], t["sha256"],
                                               "the sha256 the index publishes"))
    differ = sorted(p for p in set(wheel) | set(files) if wheel.get(p) != files.get(p))
    if differ:
        raise ForkError(f"tag {t['tag']} and {t['file']} differ in {len(differ)} file(s): {', '.join(differ[:5])}; "
                        "builds lay the tree down from the release file, so the rebase must use it "
                        "(drop --upstream-repo)")


def available(repo: str | None) -> list:
    """Final releases, from the tags of ``repo`` or from the index."""
    if repo:
        found = [t.lstrip("v") for t in release.git_tags(repo) if _FINAL.fullmatch(t)]
    else:
        found = release.index_versions()
        if found is None:
            raise ForkError("the package index does not answer: list the versions instead of a range, "
                            "or read them from git with --upstream-repo")
        found = [v for v in found if _FINAL.fullmatch(v)]
    return sorted(set(found), key=vkey)


def expand(specs: list, repo: str | None) -> list:
    """Versions named, ranges like 0.4.0..0.14.0 (both ends included) expanded."""
    out = []
    for spec in specs:
        if ".." not in spec:
            out.append(parse_target(spec)[0])
            continue
        lo, hi = (vkey(parse_target(s)[0]) for s in spec.split("..", 1))
        hits = [v for v in available(repo) if lo <= vkey(v) <= hi]
        if not hits:
            raise ForkError(f"no release in the range {spec}")
        out += hits
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- re-applying one patch
def merge3(ours: str, base: str, theirs: str, labels: tuple) -> tuple[str, int]:
    """``git merge-file --diff3``: (merged text, number of conflicts)."""
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            (Path(d) / name).write_bytes(text.encode("utf-8"))
            paths.append(str(Path(d) / name))
        cmd = ["git", "merge-file", "-p", "--diff3", *[a for lab in labels for a in ("-L", lab)], *paths]
        res = subprocess.run(cmd, capture_output=True)
    if res.returncode > 127:
        raise ForkError(f"git merge-file failed: {res.stderr.decode().strip()}")
    return res.stdout.decode("utf-8"), res.returncode


def rebase_file(fp, base, ours, theirs, labels) -> tuple:
    """One file of a patch onto ``theirs``: (new text or None, per-hunk results, conflict). The conflict is
    None, "markers" (a three-way merge left some), or why a .rej is left: "gone upstream", "already upstream"."""
    def hunks(hows, offsets=None):
        offsets = offsets or [None] * len(fp.hunks)
        return [{"path": fp.path, "hunk": n, "at": patchfile.hunk_header(h), "how": how, "offset": off}
                for n, (h, how, off) in enumerate(zip(fp.hunks, hows, offsets), 1)]

    if fp.old_path is None or fp.new_path is None:  # creates or deletes the file
        expected = base if fp.new_path is None else None
        if theirs == expected or theirs == ours:
            return ours, hunks(["clean" if theirs == expected else "three-way"] * len(fp.hunks)), None
        return theirs, hunks(["conflict"] * len(fp.hunks)), "gone upstream" if theirs is None else "already upstream"
    if theirs is not None:
        text, offsets = patchfile.apply_hunks(fp, theirs)
        exact = ["clean" if o == 0 else "offset" for o in offsets]
        if None not in offsets:
            return text, hunks(exact, offsets), None
        merged, conflicts = None, 1
        if base is not None and ours is not None:
            merged, conflicts = merge3(ours, base, theirs, labels)
        if conflicts:  # most are a line of ours beside a line upstream changed: GNU patch's fuzz places them
            fuzzed, fuzz = patchfile.apply_hunks_fuzzy(fp, theirs)
            if fuzzed is not None:
                hows = ["fuzz" if f else how for f, how in zip(fuzz, exact)]
                return fuzzed, hunks(hows, offsets), None
        if merged is None:  # a variant: no old release to merge from, so its hunks go to a .rej
            hows = ["conflict" if o is None else how for o, how in zip(offsets, exact)]
            return theirs, hunks(hows, offsets), "unmatched"
        failed = "conflict" if conflicts else "three-way"
        hows = [failed if o is None else how for o, how in zip(offsets, exact)]
        return merged, hunks(hows, offsets), "markers" if conflicts else None
    return theirs, hunks(["conflict"] * len(fp.hunks)), "gone upstream"


def rebase_patch(name, patch, old_before, old_after, new_before, labels) -> tuple[dict, dict]:
    """(new tree after the patch, result). The result's conflicts name each file left unmerged.
    ``old_before``/``old_after`` None: a variant, written for the new release, with no old tree to merge from."""
    after = dict(new_before)
    result = {"name": name, "hunks": [], "conflicts": [], "moved": {}}
    variant = old_before is None
    for fp in patch.files:
        if variant:
            base = "".join(t for h in fp.hunks for t in h.old()) if fp.new_path is None else None
            ours = "".join(t for h in fp.hunks for t in h.new()) if fp.old_path is None else None
        else:
            base = old_before.get(fp.old_path) if fp.old_path else None
            ours = old_after.get(fp.new_path) if fp.new_path else None
        src = fp.old_path or fp.new_path
        if fp.old_path and src not in after and base is not None:
            src = moved_to(src, base, after, old_before) or src
            if src != fp.old_path:
                result["moved"][fp.old_path] = src
        text, hunks, conflict = rebase_file(fp, base, ours, after.get(src), labels)
        dest = src if fp.new_path == fp.old_path else (fp.new_path or src)
        after.pop(src, None)
        if text is not None:
            after[dest] = text
        result["hunks"] += [{**h, "path": dest} for h in hunks]
        if conflict:
            rej = (patchfile.render_file(fp) if variant else patchfile.diff_file(dest, base, ours)) \
                if conflict != "markers" else None
            result["conflicts"].append({"path": dest, "kind": conflict, "rej": rej})
    result["status"] = worst(HOW[h["how"]] for h in result["hunks"])
    return after, result


def moved_to(path: str, base: str, new_tree: dict, old_tree: dict) -> str | None:
    """Where upstream moved ``path``: the file new in ``new_tree`` whose text is most like ``base`` (at
    least half its lines match for the same file name, 60% for a renamed one); None if there is none."""
    name, best, best_score = path.rsplit("/", 1)[-1], None, 0.0
    for cand, text in new_tree.items():
        if cand in old_tree or not cand.endswith(".py"):
            continue
        ratio = difflib.SequenceMatcher(None, base.splitlines(), text.splitlines(), autojunk=False).ratio()
        if ratio >= (0.5 if cand.rsplit("/", 1)[-1] == name else 0.6) and ratio > best_score:
            best, best_score = cand, ratio
    return best


def worst(statuses) -> str:
    return max(statuses, key=RANK.index, default="clean")


# ---------------------------------------------------------------- the series
def old_series(root: Path) -> tuple[list, list, dict]:
    """(patches, the old tree before/after each patch, the pin): the series as it stands on the pin."""
    pin = release.load_pin(root)
    patches = tree.load_patches(root)
    states = [release.pristine(root, pin)]
    for name, patch in patches:
        if variants.skipped(patch, pin["version"]):  # upstream has it on the pin: the tree is as before it
            states.append(states[-1])
            continue
        try:
            states.append(patchfile.apply(patch, states[-1], name)[0])
        except patchfile.PatchError as e:
            raise ForkError(f"the series does not apply to the pinned {pin['version']} itself: {e}") from None
    return patches, states, pin


def replay(patches, old_states, new_before, start, old_version, new_version, keep_going=False,
           found_variants=None) -> tuple:
    """Rebase ``patches[start:]`` onto ``new_before``. Returns (texts, results, stop): new patch texts
    by name (the headers of the texts they came from), per-patch results, and None or (k, tree before it,
    tree with the conflicts) for the first patch that does not apply. A patch with a variant serving
    ``new_version`` (``found_variants``: name -> variants) is applied from that variant instead.
    ``keep_going`` (--check) goes on past a conflict, without the conflicting files' changes, to see how
    the later patches fare."""
    texts, results, state, stop = {}, [], new_before, None
    for k in range(start, len(patches)):
        name, patch = patches[k]
        labels = (f"{old_version} + {name}", f"{old_version}", f"{new_version}")
        since = variants.skipped(patch, new_version)
        if since:  # upstream has it from new_version on, or the code it changes is not there yet: not applied
            results.append({"name": name, "hunks": [], "conflicts": [], "moved": {}, "status": "upstream",
                            "since": since, "not_yet": bool(variants.not_yet(patch, new_version))})
            continue
        v = variants.choose((found_variants or {}).get(name, []), new_version)
        if v:
            patch = v["patch"]
            after, res = rebase_patch(name, patch, None, None, state, labels)
            res["variant"] = v["rel"]
        elif variants.skipped(patch, old_version):  # not applied on the old release: no old tree to merge
            after, res = rebase_patch(name, patch, None, None, state, labels)  # from; applied as written
        else:
            after, res = rebase_patch(name, patch, old_states[k], old_states[k + 1], state, labels)
        results.append(res)
        text = None if res["conflicts"] else tree.patch_text(patch.header, state, after, changed(state, after))
        if text is None and not res["conflicts"]:
            res["status"] = "empty"
        if text is None:
            stop = stop or (k, state, after)
            if not keep_going:
                break
            for c in res["conflicts"]:
                after[c["path"]] = state.get(c["path"])
            after = {p: t for p, t in after.items() if t is not None}
        else:
            texts[name] = text
        state = after
    return texts, results, stop


def describe_hunks(res: dict, how: str) -> str:
    """'file hunk 1, 3; file2 hunk 2' for the hunks that went ``how``."""
    by_file, why = {}, {c["path"]: c["kind"] for c in res.get("conflicts", []) if c["kind"] != "markers"}
    for h in res["hunks"]:
        if h["how"] == how:
            shift = f" ({h['offset']:+d})" if how == "offset" else ""
            by_file.setdefault(h["path"], []).append(f"{h['hunk']}{shift}")
    return "; ".join(f"{p[len(PREFIX):]} hunk {', '.join(ns)}" + (f" ({why[p]})" if p in why else "")
                     for p, ns in by_file.items())


# ---------------------------------------------------------------- work folder
def work(root: Path) -> Path:
    return Path(root) / WORK


def fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for rel in [release.PIN_FILE, "PATCHES.md", *patch_files(root)]:
        text = tree.read(root, rel)
        h.update(f"{rel}\0{text}\0".encode())
    return h.hexdigest()


def patch_files(root: Path) -> list:
    """Every file under patches/ (the series, the patches, their variants), root-relative."""
    return sorted(p.relative_to(root).as_posix() for p in (Path(root) / "patches").rglob("*") if p.is_file())


class StateDamaged(ForkError):
    """.rebase/state.json cannot be read (a kill mid-write before writes were atomic, a hand edit)."""


STATE_KEYS = ("target", "old_pin", "names", "fingerprint", "results", "finished", "options")
STAGES = ("writing", "checking")  # a finished rebase: writing the new series, or checking the written one


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def state_problem(st) -> str | None:
    """What is wrong with a loaded state (a field missing or of the wrong type), or None."""
    if not isinstance(st, dict):
        return "not a JSON object"
    missing = [k for k in STATE_KEYS if k not in st]
    if missing:
        return f"field(s) missing: {', '.join(missing)}"
    for key in ("target", "old_pin"):
        rel = st[key]
        if not isinstance(rel, dict) or not all(isinstance(rel.get(k), str) for k in ("version", "file", "tag")):
            return f'"{key}" is {_shown(rel)}, not a release'
    if st["target"].get("source") not in ("pypi", "git"):
        return f'"target" has source {_shown(st["target"].get("source"))}'
    if not isinstance(st["names"], list) or not all(isinstance(n, str) and fsutil.PATCH_NAME.match(n)
                                                    for n in st["names"]):
        return f'"names" is {_shown(st["names"])}, not a list of patch names'
    if not isinstance(st["fingerprint"], str):
        return f'"fingerprint" is {_shown(st["fingerprint"])}'
    if not isinstance(st["finished"], bool):
        return f'"finished" is {_shown(st["finished"])}, not true or false'
    options = st["options"]
    if not isinstance(options, dict) or not isinstance(options.get("tests", True), bool) \
            or not isinstance(options.get("test_cmd"), (str, type(None))):
        return f'"options" is {_shown(options)}'
    results = st["results"]
    if not isinstance(results, list) or not all(_result_ok(r) for r in results):
        return f'"results" is {_shown(results)}, not a list of patch results'
    if st["finished"]:
        if st.get("stage", "checking") not in STAGES:
            return f'"stage" is {_shown(st.get("stage"))}'
    else:
        k = st.get("stopped_at")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < min(len(st["names"]), len(results)):
            return f'"stopped_at" is {_shown(k)}, not the index of a patch'
    return None


def _result_ok(res) -> bool:
    return (isinstance(res, dict) and isinstance(res.get("name"), str) and isinstance(res.get("status"), str)
            and isinstance(res.get("hunks"), list) and isinstance(res.get("conflicts"), list)
            and all(isinstance(h, dict) and isinstance(h.get("path"), str) and isinstance(h.get("how"), str)
                    for h in res["hunks"])
            and all(isinstance(c, dict) and isinstance(c.get("path"), str) and isinstance(c.get("kind"), str)
                    for c in res["conflicts"]))


def load_state(root: Path) -> dict:
    path = work(root) / "state.json"
    if not path.is_file():
        raise ForkError(f"no rebase in progress (no {WORK}/state.json)")
    try:
        st = json.loads(fsutil.read_text(path, f"{WORK}/state.json"))
        problem = state_problem(st)
        if problem:
            raise ValueError(problem)
    except (ValueError, ForkError) as e:
        raise StateDamaged(f"{WORK}/state.json is damaged ({str(e).splitlines()[0][:100]}): 'fork.py rebase --abort' "
                           "drops the rebase and restores the series as it was before it") from None
    return st


def save_state(root: Path, st: dict) -> None:
    fsutil.atomic_write(work(root) / "state.json", (json.dumps(st, indent=1) + "\n").encode(), durable=True)


def write_tree(dest: Path, files: dict) -> None:
    """``files`` as the folder ``dest``, whole or not at all: written beside it, then renamed into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        os.chmod(tmp, fsutil.DIR_MODE)  # mkdtemp makes it 0700
        for rel, text in files.items():
            tree.write(tmp, rel, text)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TRASH = WORK + ".trash-"  # .rebase/ renamed on its way out: a kill while it is deleted leaves no part of it
BACKUP_LIST = ".backup-files.json"  # in backup/: each file it holds with its sha256, written with it


def drop_work(root: Path) -> None:
    """Remove .rebase/ so that no kill leaves a part of it (a partial backup --abort would restore from, a
    state without its backup): renamed to a trash name in one step, then deleted."""
    w = work(root)
    if w.exists() or w.is_symlink():
        trash = Path(root) / f"{TRASH}{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(w, trash)
        with contextlib.suppress(OSError):
            dfd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    clear_trash(root)


def clear_trash(root: Path) -> None:
    """Delete what a killed clean-up left of an earlier .rebase/ (under its trash name)."""
    for t in Path(root).glob(TRASH + "*"):
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t, ignore_errors=True)
        else:
            t.unlink(missing_ok=True)


def backup_files(root: Path) -> dict:
    """What a rebase changes outside .rebase/ and --abort restores: the pin, PATCHES.md, patches/."""
    keep = [release.PIN_FILE, "PATCHES.md", *patch_files(root)]
    return {rel: text for rel in keep if (text := tree.read(root, rel)) is not None}


def write_backup(root: Path) -> None:
    """The series as it is, into .rebase/backup/, whole or not at all, with the list of its files (sha256)."""
    files = backup_files(root)
    listing = {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in sorted(files.items())}
    write_tree(work(root) / "backup", {**files, BACKUP_LIST: json.dumps(listing, indent=1) + "\n"})


def read_backup(root: Path) -> tuple[dict | None, str]:
    """(the backup's files, "") where .rebase/backup/ holds every file its list names, unchanged; else (None,
    what is wrong)."""
    backup = work(root) / "backup"
    if not backup.is_dir() or backup.is_symlink():
        return None, f"there is no {WORK}/backup/"
    try:
        listing = json.loads(fsutil.read_text(backup / BACKUP_LIST, f"{WORK}/backup/{BACKUP_LIST}"))
        if not isinstance(listing, dict) or not all(isinstance(v, str) for v in listing.values()):
            raise ValueError("not a list of files")
        for rel in listing:
            if rel not in (release.PIN_FILE, "PATCHES.md"):
                fsutil.check_path(rel, "patches/", f"{WORK}/backup/{BACKUP_LIST}: file")
    except (OSError, ValueError, ForkError) as e:
        return None, f"{WORK}/backup/ has no readable list of its files ({str(e).splitlines()[0][:80]})"
    saved = {rel: text for rel, text in read_tree(backup).items() if rel != BACKUP_LIST}
    bad = [rel for rel, digest in listing.items()
           if rel not in saved or hashlib.sha256(saved[rel].encode()).hexdigest() != digest]
    bad += [rel for rel in saved if rel not in listing]
    if bad:
        return None, f"{WORK}/backup/ is incomplete ({len(bad)} of its {len(listing)} files missing or changed: " \
                     f"{', '.join(sorted(bad)[:3])})"
    return saved, ""


def read_tree(src: Path) -> dict:
    return {p.relative_to(src).as_posix(): fsutil.read_text(p, p.relative_to(src.parent).as_posix())
            for p in sorted(src.rglob("*")) if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def check_clean(root: Path) -> None:
    res = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True)
    if res.returncode:
        raise ForkError(f"{root} is not a git checkout, so whether its tree is clean cannot be told "
                        f"({res.stderr.strip()})")
    if res.stdout.strip():
        raise ForkError("the working tree has uncommitted changes to tracked files; commit or stash them first:\n"
                        + "\n".join("  " + line for line in res.stdout.rstrip().splitlines()))
    edited = tree.hand_edits(root)
    if edited:
        raise ForkError("laid-down upstream files have hand edits: " + ", ".join(edited)
                        + "\n  keep them with 'fork.py refresh' and commit, or drop them with "
                          "'fork.py materialize --force'")


# ---------------------------------------------------------------- rebase, --continue, --abort
def cmd_rebase(args) -> int:
    root = Path(args.root)
    if (work(root) / "state.json").exists():
        raise ForkError(f"a rebase is in progress ({WORK}/): 'fork.py rebase --continue' or 'fork.py rebase --abort'")
    check_clean(root)
    clear_trash(root)
    version = parse_target(args.target[0])[0]
    say(f"reading diffusers {version} ("
        + (f"tag of {args.upstream_repo}" if args.upstream_repo else "its release file from the index, sha256 checked")
        + ") and the series as it stands")
    repo = upstream_repo(root, args.upstream_repo)
    target = resolve(root, args.target[0], repo, for_pin=True)
    patches, old_states, pin = old_series(root)
    if target["version"] == pin["version"] and target["tag"] == pin["tag"]:
        raise ForkError(f"the series is already on {pin['version']} ({pin['tag']})")
    new_base = target_files(root, target)
    if repo:
        same_as_release(root, target, new_base)
    shadows = sorted(tree.tracked(root) & set(new_base))
    if shadows:
        raise ForkError(f"{target['version']} has file(s) where we keep our own: {', '.join(shadows)}; "
                        "rename ours first")
    if work(root).exists():
        drop_work(root)  # leftovers of no rebase in progress
    st = {"target": target, "old_pin": pin, "names": [n for n, _ in patches], "fingerprint": fingerprint(root),
          "results": [], "finished": False, "options": {"tests": not args.no_tests, "test_cmd": args.test_cmd}}
    say(f"rebasing {len(patches)} patches from {pin['version']} onto {target['version']} "
        f"({source_line(target)})")
    return proceed(root, st, 0, new_base, {}, patches, old_states)


def say(line: str) -> None:
    """A line of progress, shown at once (stdout may be a pipe)."""
    print(line, flush=True)


def source_line(t: dict) -> str:
    if t["source"] == "git":
        return f"tag {t['tag']} of {t['repo']}, commit {t['commit'][:12]}"
    return f"{t['file']}, sha256 {t['sha256'][:12]}... as the index publishes" + (
        f"; commit {t['commit'][:12]} as pinned before in this project's history" if t.get("commit") else "")


def proceed(root, st, start, new_before, texts, patches, old_states, options: dict | None = None) -> int:
    old, new = st["old_pin"]["version"], st["target"]["version"]
    more, results, stop = replay(patches, old_states, new_before, start, old, new,
                                 found_variants=variants.load(root, st["names"]))
    texts.update(more)
    st["results"] = st["results"][:start] + results
    for res in results:
        print_result(res)
    if stop:
        return stopped(root, st, texts, *stop)
    return finish(root, st, texts, options or st["options"])


def print_result(res: dict) -> None:
    if res.get("not_yet"):
        print(f"  {res['name']:<34} from {res['since']}: not applied (the code it changes is not in this release)")
        return
    if res.get("since"):
        print(f"  {res['name']:<34} upstream since {res['since']}: not applied (kept in the series for older releases)")
        return
    hows = [how for how in ("offset", "three-way", "fuzz", "conflict") if any(h["how"] == how for h in res["hunks"])]
    detail = "; ".join((f"{how}: " if len(hows) > 1 else "") + describe_hunks(res, how) for how in hows)
    print(f"  {res['name']:<34} {res['status']:<10} {detail}{moves(res)}"
          + (f" (from patches/{res['variant']})" if res.get("variant") else ""), flush=True)


def inexact_hunks(results: list) -> list[str]:
    """One line per hunk that did not apply exactly (three-way merge, fuzz) and per patch resolved by hand:
    what to read in the rebased tree before trusting it."""
    lines = []
    for res in results:
        if res.get("status") == "resolved":
            hand = ", ".join(c["path"][len(PREFIX):] for c in res["conflicts"]) or "?"
            lines.append(f"  {res['name']}: resolved by hand in {hand}")
        for h in res["hunks"]:
            if h["how"] in ("three-way", "fuzz"):
                lines.append(f"  {res['name']}: {h['path'][len(PREFIX):]} hunk {h['hunk']} ({h['at']}): {h['how']}")
    return lines


def moves(res: dict) -> str:
    found = [f"{a[len(PREFIX):]} -> {b[len(PREFIX):]}" for a, b in res.get("moved", {}).items()]
    return f" (upstream moved {', '.join(found)})" if found else ""


def stopped(root, st, texts, k, before, after) -> int:
    res, name = st["results"][k], st["names"][k]
    st["stopped_at"] = k
    # the state goes last: a kill before it leaves no state (nothing outside .rebase/ has changed yet, and
    # --abort or a new rebase clears the folder), never a state naming a half-written tree
    (work(root) / "state.json").unlink(missing_ok=True)
    write_tree(work(root) / "patches", texts)
    write_tree(work(root) / "tree", after)
    where = f"{WORK}/tree/"
    lines = [f"rebase onto {st['target']['version']} stopped: {name} does not apply"]
    if res["status"] == "empty":
        lines += [f"  it changes nothing on {st['target']['version']} (upstream has its change?): drop it from "
                  "patches/series and commit, then 'fork.py rebase --abort' and start again"]
    for c in res["conflicts"]:
        hunks = [h for h in res["hunks"] if h["path"] == c["path"] and h["how"] == "conflict"]
        at = ", ".join(f"hunk {h['hunk']} ({h['at']})" for h in hunks)
        if c["kind"] != "markers":
            tree.write(work(root) / "tree", c["path"] + ".rej", c["rej"])
            why = ("the variant's lines are not there" if c["kind"] == "unmatched"
                   else f"the file is {c['kind']} (renamed?)")
            lines.append(f"  {c['path']}: {at}: {why}; the change is in {where}{c['path']}.rej")
        else:
            lines.append(f"  {c['path']}: {at}: conflicts in a three-way merge; markers in {where}{c['path']}")
    lines += [f"resolve in {where} (the whole new tree; remove the markers and any .rej), "
              "then 'fork.py rebase --continue';",
              "or 'fork.py rebase --abort'. The working tree, upstream.json and patches/ are unchanged."]
    tree.write(work(root), "CONFLICT.txt", "\n".join(lines) + "\n")
    save_state(root, st)
    print("\n".join(lines), file=sys.stderr)
    return 1


def cmd_continue(args) -> int:
    root = Path(args.root)
    st = load_state(root)
    old, new = st["old_pin"]["version"], st["target"]["version"]
    # this --continue's own --no-tests/--test-cmd, for the checks at its end (the state keeps the rebase's)
    options = {**st["options"], **({"tests": False} if args.no_tests else {}),
               **({"test_cmd": args.test_cmd} if args.test_cmd else {})}
    if st["finished"]:
        if st.get("stage", "checking") == "writing":
            raise ForkError(f"the rebase onto {new} was interrupted while writing the rebased series, so the tree may "
                            f"be half way between {old} and {new}: 'fork.py rebase --abort' restores {old}, then start "
                            "again")
        say(f"the rebased series onto {new} is in place: checking it"
            + ("" if options.get("tests", True) else " (without the tests: --no-tests)"))
        return run_checks(root, st, options)
    check_clean(root)
    if fingerprint(root) != st["fingerprint"]:
        raise ForkError("upstream.json, PATCHES.md or patches/ changed since the rebase started: "
                        "'fork.py rebase --abort'")
    k, name = st["stopped_at"], st["names"][st["stopped_at"]]
    patches, old_states, _ = old_series(root)
    new_base = target_files(root, st["target"])
    texts = {n: tree.read(work(root), f"patches/{n}") for n in st["names"][:k]
             if (work(root) / "patches" / n).is_file()}
    before, _ = tree.apply_series(new_base, [(n, patchfile.parse(texts[n], n)) for n in st["names"][:k] if n in texts],
                                  strict=True)
    after = read_tree(work(root) / "tree")
    edited = changed(before, after)
    unresolved = sorted(p for p in after if p.endswith(".rej") or p in edited and has_markers(after[p]))
    if unresolved:
        raise ForkError(f"not resolved yet in {WORK}/tree/: " + ", ".join(unresolved)
                        + " (remove the conflict markers; apply and delete each .rej)")
    used = st["results"][k].get("variant")
    header = patchfile.parse(tree.read(root, f"patches/{used}"), used).header if used else patches[k][1].header
    text = tree.patch_text(header, before, after, edited)
    if text is None:
        raise ForkError(f"the resolution leaves {name} empty: drop it from patches/series first "
                        "('fork.py rebase --abort', commit, start again)")
    texts[name] = text
    st["results"][k]["status"] = "resolved"
    hand = [c["path"][len(PREFIX):] for c in st["results"][k]["conflicts"]]
    print(f"  {name:<34} resolved   by hand in {', '.join(hand)}; the patch now touches {len(edited)} file(s)")
    return proceed(root, st, k + 1, after, texts, patches, old_states, options)


def changed(before: dict, after: dict) -> set:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def has_markers(text: str) -> bool:
    return any(line.startswith(("<<<<<<< ", ">>>>>>> ", "||||||| ")) for line in text.splitlines())


def cmd_abort(args) -> int:
    """Drop the rebase. Where it finished (its backup of the series is in .rebase/backup/), restore the series
    and lay the tree down again. A damaged or missing state is no obstacle: the backup is made whole (renamed
    into place, with the list of its files) before anything outside .rebase/ changes, so where there is one it
    is restored, and where there is none nothing outside .rebase/ changed. A backup that is not whole (or none
    where the state says the rebase finished) is refused: nothing is deleted that cannot be restored."""
    root = Path(args.root)
    clear_trash(root)
    try:
        st = load_state(root)
    except StateDamaged as e:
        print(f"warning: {str(e).split(':', 1)[0]}: dropping the rebase from what {WORK}/ holds", file=sys.stderr)
        st = None
    except ForkError:
        if not work(root).exists():
            raise
        st = None  # a rebase stopped before it saved its state: only .rebase/ holds anything of it
    if not (st["finished"] if st else (work(root) / "backup").exists()):
        drop_work(root)
        old = st["old_pin"]["version"] if st else release.load_pin(root)["version"]
        say(f"rebase aborted: nothing outside {WORK}/ had changed; the series is on {old} as before")
        return 0
    saved, why = read_backup(root)
    if saved is None:
        raise ForkError(f"cannot restore the series as it was before the rebase: {why}; nothing is restored or "
                        "deleted. Git has it (the rebase started from a clean tree): 'git checkout HEAD -- "
                        f"{release.PIN_FILE} PATCHES.md patches', 'git clean -n patches' for files the rebase added, "
                        f"'fork.py materialize --force', then delete {WORK}/")
    for rel in patch_files(root):
        if rel not in saved:  # added by the rebase: the backup, whole, is the series before it
            (root / rel).unlink()
    for rel, text in saved.items():
        tree.write(root, rel, text)
    prune_variants(root)
    tree.materialize(root, force=True)
    drop_work(root)
    say(f"rebase aborted: the series is on {release.load_pin(root)['version']} as before the rebase "
        f"(restored from {WORK}/backup/)")
    return 0


def interrupted(root: Path, what: str) -> str:
    """One line for Ctrl-C during ``rebase``/``--continue``/``--abort``: what it left, and how to go on."""
    head = f"interrupted (Ctrl-C) during 'rebase {what}'"
    try:
        st = load_state(root)
    except StateDamaged:
        return f"{head}; {WORK}/state.json is damaged: 'fork.py rebase --abort' drops the rebase, restores the series"
    except ForkError:  # no state
        if what == "--abort" and not work(root).exists():
            return f"{head}; the abort had finished: the series is on {release.load_pin(root)['version']}"
        if what == "--abort" or (work(root) / "backup").exists():
            return f"{head}; {WORK}/ is still there: run 'fork.py rebase --abort' (again) to drop it"
        return (f"{head}; nothing outside {WORK}/ changed: start again with 'fork.py rebase TARGET' "
                f"(it clears {WORK}/)")
    old, new = st["old_pin"]["version"], st["target"]["version"]
    if what == "--abort":
        return f"{head}; the abort is not finished: run 'fork.py rebase --abort' again to restore {old}"
    if not st["finished"]:
        name = st["names"][st["stopped_at"]]
        return (f"{head}; the rebase onto {new} is still stopped at {name}, as before: resolve in {WORK}/tree/ and "
                "'fork.py rebase --continue', or 'fork.py rebase --abort'")
    if st.get("stage", "checking") == "writing":
        return (f"{head} while writing the rebased series: the tree may be half way between {old} and {new}: "
                f"'fork.py rebase --abort' restores {old}")
    return (f"{head}: the rebased tree onto {new} is in place, its checks not finished: 'fork.py rebase --continue' "
            f"runs them again ('--continue --no-tests' without the tests), 'fork.py rebase --abort' restores {old}")


# ---------------------------------------------------------------- finishing
def finish(root: Path, st: dict, texts: dict, options: dict) -> int:
    target, old = st["target"], st["old_pin"]
    say(f"writing the rebased series, {release.PIN_FILE} and PATCHES.md, and laying {target['version']} down in "
        f"{PREFIX} (the series as it was is kept in {WORK}/backup/ until the checks pass)")
    write_backup(root)
    st.update(finished=True, stage="writing")  # from here on the tree outside .rebase/ changes: --abort restores
    save_state(root, st)
    try:
        write_patches(root, st, texts)
        release.save_pin(root, new_pin(old, target))
        tree.write_patches_doc(root)
        tree.materialize(root)
    except (ForkError, OSError) as e:  # OSError: a full disk, a file that cannot be written
        raise ForkError(f"{e}\n  the rebase is half done: 'fork.py rebase --abort' restores {old['version']}") from None
    st["stage"] = "checking"
    save_state(root, st)
    say(f"rebased onto {target['version']}: patches rewritten with zero fuzz against it; "
        f"upstream.json {old['version']} -> {target['version']}; PATCHES.md updated")
    inexact = inexact_hunks(st["results"])
    say(f"hunks not applied exactly ({len(inexact)}): read these in the rebased tree"
        if inexact else "hunks not applied exactly: none (every hunk clean or at an offset)")
    if inexact:
        say("\n".join(inexact))
    return run_checks(root, st, options)


def run_checks(root: Path, st: dict, options: dict) -> int:
    """verify, the import of every pipeline class, the tests, on the rebased tree in place. Where all pass,
    .rebase/ goes; else it stays (with what failed), for --continue to check again or --abort to restore."""
    old, new = st["old_pin"]["version"], st["target"]["version"]
    problems = tree.verify(root)
    say("verify: OK" if not problems else "verify: FAILED\n" + "\n".join(f"  - {p}" for p in problems))
    say("import: importing diffusers and each pipeline class it exports, in a subprocess ...")
    imported = import_pipelines(root / "src", required_packages(root, st["target"]))
    say("\n".join(import_lines(imported)))
    announce = tests_announcement(root, options)
    if announce:
        say(announce)
    ok, summary = run_tests(root, options, stream=True)
    say(f"tests: {summary}")
    failed = [what for what, bad in (("verify", problems), ("the import check", not import_ok(imported)),
                                     ("the tests", ok is False)) if bad]
    if failed:
        st["failed"] = failed
        save_state(root, st)
        print(f"the rebased tree onto {new} is in place, but {' and '.join(failed)} failed: fix it, then "
              f"'fork.py rebase --continue' checks it again (or commit it and delete {WORK}/); "
              f"or 'fork.py rebase --abort' restores {old}", file=sys.stderr)
        return 1
    drop_work(root)
    say(f"done: the series is on {new}, not committed: review 'git diff' and commit it "
        "(the next 'fork.py rebase' refuses a tree with uncommitted changes)")
    return 0


def new_pin(old: dict, target: dict) -> dict:
    """The pin for ``target``, fields in the usual order; the commit is the tag's (from git) or the one a pin of
    the same release committed in this project's history gave, else none (a stale one would mislead)."""
    new = {**old, **{k: target.get(k) for k in ("version", "file", "sha256", "tag", "commit")}}
    order = ["package", "version", "file", "sha256", "tag", "commit", "repo", "fork_release"]
    return {k: new[k] for k in sorted(new, key=lambda k: order.index(k) if k in order else len(order))
            if new[k] is not None}


def write_patches(root: Path, st: dict, texts: dict) -> None:
    """Write the rebased series. A variant that applied unchanged becomes the main patch (its file goes);
    each main patch the rebase replaces is kept as the variant for the release it served, unless the
    rebase back would make it again byte for byte from its replacement (see ``reproducible``) and it never
    was a variant file (a variant stays one through any trip of releases)."""
    old, new = st["old_pin"]["version"], st["target"]["version"]
    names = st["names"]
    found = variants.load(root, names)
    mains = {n: tree.read(root, f"patches/{n}") for n in names}
    out, promoted = {}, set()
    for res in st["results"]:
        name, used = res["name"], res.get("variant")
        if res.get("not_yet"):  # the code it changes is not in the new release: its text for the newest
            newest = variants.newest(found.get(name, []), mains[name])  # release it serves becomes the main one
            out[name] = newest["text"] if newest else mains[name]
            if newest:
                promoted.add(newest["rel"])
            continue
        if res.get("since"):  # not applied on the new release: kept byte for byte for the older ones
            out[name] = mains[name]
            continue
        source = tree.read(root, f"patches/{used}") if used else mains[name]
        out[name] = new_text(texts[name], source, new, res["status"] == "resolved")
        if used and out[name] == source:
            promoted.add(used)
    left = {n: [v for v in vs if v["rel"] not in promoted] for n, vs in found.items()}
    again = reproducible(root, st, names, out, mains, left)
    kept = set()
    for name in names:
        if out[name] == mains[name]:
            continue
        # a text that was a variant file in this project's history stays one even where the rebase back would
        # make it again: a later rebase reaches its release from another text (the pin's), which may not
        if name not in again or history_label(root, name, mains[name]):
            keep = patchfile.parse(mains[name], name)
            label, text = kept_label(root, name, keep, mains[name], old), mains[name]
            if not covers(keep.field("Applies-To"), label):  # a text kept for a release must say it serves it
                text = patchfile.render(patchfile.set_field(keep.header, "Applies-To", ", ".join(
                    filter(None, [keep.field("Applies-To"), label]))), [diff_body(text)])
            kept.add(variants.rel_path(name, label))
            tree.write(root, f"patches/{variants.rel_path(name, label)}", text)
        tree.write(root, f"patches/{name}", out[name])
    for rel in promoted - kept:
        (root / "patches" / rel).unlink()
    prune_variants(root)


def kept_label(root: Path, name: str, patch, text: str, old: str) -> str:
    """The release a replaced main text is kept for: the name it had as a variant where this project's history
    holds it, byte for byte, under patches/variants/ (a variant the rebase there promoted to the main text,
    named after a release other than the one rebased to: 0.42.1.patch serving 0.40.0..0.42.1); else ``old``,
    which it served; but a text upstream has the change of on ``old`` (Applied-Upstream) did not serve it: the
    last release its Applies-To names before that."""
    label = history_label(root, name, text)
    if label and covers(patch.field("Applies-To"), label):
        return label
    since = variants.skipped(patch, old)
    if not since:
        return old
    if variants.not_yet(patch, old):  # it did not serve old (too early for it): the newest release it serves
        return ".".join(map(str, variants.last_served(patch.field("Applies-To")))) or old
    try:
        served = [hi for _, hi in variants.parse_applies(patch.field("Applies-To")) if hi < vkey(since)]
    except ForkError:
        served = []
    return ".".join(map(str, max(served))) if served else old


def history_label(root: Path, name: str, text: str) -> str | None:
    """The release a variant file with exactly ``text`` was last named after in the project's git history."""
    data = text.encode("utf-8")
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    folder = f"patches/{variants.DIR}/{variants.stem(name)}/"
    res = subprocess.run(["git", "-C", str(root), "log", "-m", "--format=", "--raw", "--no-abbrev", "--no-renames",
                          "HEAD", "--", folder], capture_output=True, text=True)
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        meta, _, path = line.partition("\t")
        fields = meta.split()
        if line.startswith(":") and len(fields) >= 4 and fields[3] == blob and path.endswith(".patch"):
            return path[len(folder):-len(".patch")] if "/" not in path[len(folder):] else None
    return None


def prune_variants(root: Path) -> None:
    """Remove the empty folders of patches/variants/ (and the folder itself when empty)."""
    for folder in (root / "patches" / variants.DIR).glob("*/"):
        if not any(folder.iterdir()):
            folder.rmdir()
    if (root / "patches" / variants.DIR).is_dir() and not any((root / "patches" / variants.DIR).iterdir()):
        (root / "patches" / variants.DIR).rmdir()


def reproducible(root: Path, st: dict, names: list, out: dict, mains: dict, left: dict) -> set:
    """The patches whose old text a rebase back to the old release would make again, byte for byte, from
    the new text (by the same clean/offset/three-way/fuzz steps), or from the variant that serves the old
    release there (one with a range, say, which the main text came from): they need no variant of their own.
    Checked one patch at a time against the old tree before it, which the rebase back rebuilds exactly
    (each earlier patch is either made again or restored from its variant)."""
    old, new = st["old_pin"]["version"], st["target"]["version"]
    try:
        new_base = target_files(root, st["target"])
        parsed = [(n, patchfile.parse(out[n], n)) for n in names]
        new_states = [new_base]
        for n, patch in parsed:
            new_states.append(new_states[-1] if variants.skipped(patch, new) else
                              patchfile.apply(patch, new_states[-1], n, strict=True)[0])
        _, old_states, _ = old_series(root)
    except (ForkError, patchfile.PatchError):
        return set()
    same = set()
    for k, (name, patch) in enumerate(parsed):
        if out[name] == mains[name]:
            continue
        if variants.skipped(patch, old):
            continue  # the rebase back would not apply it, so it would not make the old text: keep that
        labels = (f"{new} + {name}", new, old)
        serving = [v for v in left.get(name, []) if covers(v["applies"], old)]
        if serving:  # the rebase back takes that variant: no other needed where it makes the old text again
            try:
                v = variants.choose(serving, old)
            except ForkError:
                continue
            after, res = rebase_patch(name, v["patch"], None, None, old_states[k], labels)
            text = None if res["conflicts"] else tree.patch_text(v["patch"].header, old_states[k], after,
                                                                 changed(old_states[k], after))
            if text is not None and new_text(text, v["text"], old, False) == mains[name]:
                same.add(name)
            continue
        if variants.skipped(patch, new):  # not applied on the new release: the rebase back applies it as written
            after, res = rebase_patch(name, patch, None, None, old_states[k], labels)
            text = None if res["conflicts"] else tree.patch_text(patch.header, old_states[k], after,
                                                                 changed(old_states[k], after))
            if text is not None and new_text(text, out[name], old, False) == mains[name]:
                same.add(name)
            continue
        after, res = rebase_patch(name, patch, new_states[k], new_states[k + 1], old_states[k], labels)
        if res["conflicts"]:
            continue
        text = tree.patch_text(patch.header, old_states[k], after, changed(old_states[k], after))
        if text is not None and new_text(text, out[name], old, False) == mains[name]:
            same.add(name)
    return same


def covers(applies: str | None, version: str) -> bool:
    try:
        return variants.covers(applies, version)
    except ForkError:
        return False


def new_text(text: str, source: str, version: str, by_hand: bool) -> str:
    """The patch file for ``version``: ``source`` (the main patch or the variant it came from) byte for byte
    where the rebase left its diffs as they were and its Applies-To covers ``version``; else its header with
    Applies-To ``version`` (so that a text is labelled alike however the series came to the release: a round
    trip through several releases restores it), and today's Last-Update where the change itself (its - and +
    lines) is new, not only its context and line numbers."""
    header = patchfile.parse(source, "source").header
    if not by_hand and diff_body(text) == diff_body(source):
        if covers(patchfile.parse(source, "source").field("Applies-To"), version):
            return source
        return patchfile.render(patchfile.set_field(header, "Applies-To", version), [diff_body(source)])
    header = patchfile.set_field(header, "Applies-To", version)
    if by_hand or change_lines(text) != change_lines(source):
        header = patchfile.set_field(header, "Last-Update", datetime.date.today().isoformat())
    return patchfile.render(header, [diff_body(text)])


def change_lines(text: str) -> list:
    """What a patch changes, without where: per file, its removed and added lines."""
    return [(fp.old_path, fp.new_path, [(t, line) for h in fp.hunks for t, line in h.lines if t in "+-"])
            for fp in patchfile.parse(text, "patch").files]


def diff_body(text: str) -> str:
    """A patch's diffs, without its header."""
    return text if text.startswith("--- ") else text[text.index("\n--- ") + 1:]


def tests_command(root: Path, options: dict) -> str | None:
    if not options.get("tests", True):
        return None
    if options.get("test_cmd"):
        return options["test_cmd"]
    return f"{shlex.quote(sys.executable)} -m pytest -q -x tests" if (Path(root) / "tests").is_dir() else None


def run_tests(root: Path, options: dict, src: Path | None = None, stream: bool = False) -> tuple[bool | None, str]:
    """(passed, one-line summary); None: not run. ``src`` (default root/src) comes first on PYTHONPATH, so
    the tree under test is the one imported even where another checkout is installed. ``stream``: the
    command's output is shown as it comes (pytest's progress); it runs in its own process group, which
    Ctrl-C here stops (its output then dropped) before the KeyboardInterrupt goes on."""
    cmd = tests_command(root, options)
    if cmd is None:
        return None, "not run" + ("" if not options.get("tests", True) else " (no tests/ folder)")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(src or Path(root) / "src"), os.environ.get("PYTHONPATH")])))
    if stream:
        env["PYTHONUNBUFFERED"] = "1"  # its progress as it comes, not a pipe's buffer at a time
    if not stream:
        res = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
        rc, output = res.returncode, res.stdout + res.stderr
    else:
        start = time.monotonic()
        rc, output = _streamed(cmd, root, env)
        if rc == 0 and not options.get("test_cmd"):
            record_test_time(root, cmd, time.monotonic() - start)
    last = ([ln for ln in output.splitlines() if ln.strip()] or [""])[-1].strip()
    verdict = "passed" if rc == 0 else f"FAILED (exit {rc})"
    return rc == 0, f"{verdict}: {cmd}" + (f": {last[:100]}" if last else "")


def _streamed(cmd: str, cwd: Path, env: dict) -> tuple[int, str]:
    """Run ``cmd``, copying its output to ours as it comes; (exit status, the last 8 kB of its output)."""
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    decoder, tail = codecs.getincrementaldecoder("utf-8")("replace"), ""
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            text = decoder.decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-8192:]
        return proc.wait(), tail
    except BaseException:
        _stop(proc)
        if tail and not tail.endswith("\n"):  # pytest's dots end mid-line: the message goes on a line of its own
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write("\n")
                sys.stdout.flush()
        raise
    finally:
        proc.stdout.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop a command started in its own process group: SIGINT (pytest ends cleanly), SIGKILL after 5 s."""
    try:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGINT)
        proc.stdout.close()
        proc.wait(timeout=5)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


TESTS_TIME = "rebase-tests.json"  # in the cache: how long the project's suite took the last time it passed
SUITE_MINUTES = 10  # the project's whole suite on 2 CPU cores (docs/maintaining.md: 8 to 11 minutes)


def record_test_time(root: Path, cmd: str, seconds: float) -> None:
    with contextlib.suppress(OSError):
        fsutil.atomic_write(release.cache_dir(root) / TESTS_TIME,
                            json.dumps({"cmd": cmd, "seconds": round(seconds, 1)}).encode())


def last_test_time(root: Path, cmd: str) -> float | None:
    try:
        got = json.loads((release.cache_dir(root) / TESTS_TIME).read_text())
        seconds = got["seconds"] if got.get("cmd") == cmd else None
        return float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def tests_announcement(root: Path, options: dict) -> str | None:
    """What the test step is about to run and for about how long, and how to skip or stop it; None: no tests."""
    cmd = tests_command(root, options)
    if cmd is None:
        return None
    if options.get("test_cmd"):
        length = "how long it takes is up to the --test-cmd"
    else:
        last = last_test_time(root, cmd)
        length = (f"the last run here took {last / 60:.1f} min" if last
                  else f"about {SUITE_MINUTES} min on 2 CPU cores, longer under load")
    return (f"running the tests on the rebased tree: {cmd}\n"
            f"  {length}; their progress follows. --no-tests skips them; Ctrl-C stops them and keeps the rebase "
            "('fork.py rebase --continue --no-tests' then finishes it without them)")


# ---------------------------------------------------------------- --check
def cmd_check(args) -> int:
    root = Path(args.root)
    repo = upstream_repo(root, args.upstream_repo)
    versions = expand(args.target, repo)
    patches, old_states, pin = old_series(root)
    rows = [check_one(root, v, repo, patches, old_states, pin, args) for v in versions]
    names = ", ".join(n.split("-", 1)[0] for n, _ in patches)
    print(f"series {names} (from {pin['version']}) on each release; source: "
          + (f"tags of {repo}" if repo else "release files from the index, sha256 checked"))
    print("| release | series | detail | later patches (past the conflict, without its files) | import | tests |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['version']} | {r['status']} | {r['detail']} | {r['later']} | {r['import']} | {r['tests']} |")
    return 0 if all(r["status"] in RANK[:3] for r in rows) else 1


def check_one(root, version, repo, patches, old_states, pin, args) -> dict:
    row = {"version": version, "import": "-", "tests": "not run", "later": "-"}
    try:
        target = resolve(root, version, repo, for_pin=False)
        new_base = target_files(root, target)
    except ForkError as e:
        return {**row, "status": "error", "detail": str(e).replace("|", "/")}
    texts, results, stop = replay(patches, old_states, new_base, 0, pin["version"], version, keep_going=True,
                                  found_variants=variants.load(root, [n for n, _ in patches]))
    first = results[: stop[0] + 1] if stop else results
    row["status"] = worst(r["status"] for r in first if not r.get("since"))
    row["detail"] = check_detail(first)
    if stop:
        row["later"] = ", ".join(later(r) for r in results[stop[0] + 1:]) or "-"
    else:
        row["import"], row["tests"] = try_tree(root, pin, new_base, texts, patches, args,
                                               required_packages(root, target))
    return row


def later(res: dict) -> str:
    if res.get("since"):
        return skip_note(res)
    n = len(res["conflicts"])
    return f"{res['name'][:4]} {res['status']}" + (f" ({n} file{'s' * (n > 1)})" if n else "")


def check_detail(results: list) -> str:
    last = results[-1]
    if last["status"] in ("conflict", "empty"):
        files = [c["path"][len(PREFIX):] + ("" if c["kind"] == "markers" else f" ({c['kind']})")
                 for c in last["conflicts"]]
        return f"{last['name']}: {', '.join(files) or 'changes nothing (upstream has it?)'}"
    parts = [f"{r['name'][:4]} {how}: {describe_hunks(r, how)}" for how in ("three-way", "fuzz") for r in results
             if any(h["how"] == how for h in r["hunks"])]
    offsets = [f"{r['name'][:4]} x{sum(h['how'] == 'offset' for h in r['hunks'])}" for r in results
               if any(h["how"] == "offset" for h in r["hunks"])]
    moved = [f"{r['name'][:4]}{moves(r)}" for r in results if r.get("moved")]
    used = [f"{r['name'][:4]} {label(r)}" for r in results if r.get("variant")]
    gone = [skip_note(r) for r in results if r.get("since")]
    return "; ".join(gone + (["variants: " + ", ".join(used)] if used else []) + parts
                     + (["offsets: " + ", ".join(offsets)] if offsets else []) + moved) or "-"


def skip_note(res: dict) -> str:
    """'0008 upstream since 0.7.0', or '0012 from 0.17.0' for a patch whose code is not in the release yet."""
    return f"{res['name'][:4]} {'from' if res.get('not_yet') else 'upstream since'} {res['since']}"


def label(res: dict) -> str:
    """'variant 0.4.1' for a result applied from patches/variants/<name>/0.4.1.patch."""
    return "variant " + res["variant"].rsplit("/", 1)[-1][:-len(".patch")] if res.get("variant") else "main"


def try_tree(root, pin, new_base, texts, patches, args, required: set | None = None) -> tuple[str, str]:
    """Lay the result in a scratch folder with our own modules; (import check, tests)."""
    if args.no_import and not args.tests:
        return "not run", "not run"
    files, _ = tree.apply_series(new_base, [(n, patchfile.parse(texts[n], n)) for n, _ in patches if n in texts],
                                 strict=True)
    with tempfile.TemporaryDirectory() as d:
        for rel, text in files.items():
            tree.write(Path(d), rel, text)
        for rel in tree.tracked(root):
            tree.write(Path(d), rel, tree.read(root, rel))
        tree.write(Path(d), tree.VERSION_FILE, tree.version_file(pin))
        imported = "not run" if args.no_import else import_check(Path(d) / "src", required)
        imported = imported if len(imported) <= 300 else imported[:297] + "..."
        tests = "not run"
        if args.tests:
            options = {"tests": True, "test_cmd": args.test_cmd}
            ok, summary = run_tests(root, options, src=Path(d) / "src")
            tests = "not run" if ok is None else tests_cell(args.test_cmd, tests_command(root, options), ok, summary)
    return imported, tests.replace("|", "/")


PYTEST_COUNTS = re.compile(r"\b(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")


def tests_cell(test_cmd: str | None, cmd: str, ok: bool, summary: str) -> str:
    """--check's tests column: which tests ran and what came of them, e.g. 'project: 120 passed, 3 skipped'
    (the project's suite) or 'CMD: FAIL: 1 failed, 40 passed' (a --test-cmd)."""
    what = "project" if not test_cmd else test_cmd[:60]
    last = summary.partition(f"{cmd}: ")[2]
    counts = ", ".join(f"{n} {kind}" for n, kind in PYTEST_COUNTS.findall(last))
    return f"{what}: " + ("" if ok else "FAIL: ") + (counts or last or ("passed" if ok else "no output"))


IMPORT_PIPELINES = r"""
import importlib.util, json, os, re, sys

REQUIRED = json.loads(os.environ.get("DIFFUSERS_FLASH_REQUIRED") or "null")


def why(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"[:200]


def absent(e):  # the package a failed import names: third-party, not installed here, not one the release requires
    found = re.search(r"No module named '([\w.]+)'", str(e))
    top = found.group(1).split(".")[0] if found else None
    if REQUIRED is None or not top or top == "diffusers" or importlib.util.find_spec(top) is not None:
        return None
    return None if re.sub(r"[-_.]+", "-", top).lower() in REQUIRED else top


out = {"file": None, "error": None, "pipelines": [], "placeholders": [], "failed": {}, "missing": {}}
try:
    import diffusers as m
    out["file"] = m.__file__
except BaseException as e:
    out["error"] = why(e)
else:
    exported = {n for n in (getattr(m, "__all__", None) or ()) if isinstance(n, str)} | set(dir(m))
    for name in sorted(n for n in exported if "Pipeline" in n and n[:1].isupper()):
        try:
            obj = getattr(m, name)
        except BaseException as e:
            if absent(e):  # the release needs a package this environment lacks: pristine fails the same
                out["missing"][name] = absent(e)
            else:
                out["failed"][name] = why(e)
            continue
        out["pipelines"].append(name)
        if type(obj).__name__ == "DummyObject":  # a placeholder for a backend not installed (flax, onnx)
            out["placeholders"].append(name)
print()
print(json.dumps(out))
"""


def required_packages(root: Path, t: dict) -> set | None:
    """The normalized names the release ``t`` requires (its ``Requires-Dist`` without an extra), or None where
    its release file is not at hand (a git tag): then every class that does not import is a failure."""
    from . import build

    if t.get("source") == "git" or not t.get("file") or not t.get("sha256"):
        return None
    try:
        meta, _ = build.metadata(release.fetch(root, t["version"], t["file"], t["sha256"],
                                               "the sha256 the index publishes"))
    except ForkError:
        return None
    lines = email.parser.Parser().parsestr(meta, headersonly=True).get_all("Requires-Dist") or []
    return {build._name(line) for line in lines if "extra" not in line.partition(";")[2]}


def import_pipelines(src: Path, required: set | None = None) -> dict:
    """Import ``diffusers`` from ``src`` in a subprocess, then every pipeline class it exports (``__all__`` and
    ``dir()``: a lazy module imports each on access). {"src", "file", "error", "pipelines", "placeholders",
    "failed": {name: why}, "missing": {name: package}}: a class whose import names a third-party package
    that is not installed here and not among ``required`` (the release's own requirements, see
    :func:`required_packages`) is "missing", not failed: pristine upstream fails the same. With ``required``
    None, every class that does not import is failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src),
               DIFFUSERS_FLASH_REQUIRED=json.dumps(None if required is None else sorted(required)))
    res = subprocess.run([sys.executable, "-c", IMPORT_PIPELINES], capture_output=True, text=True, env=env, cwd=src)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = ([ln for ln in res.stderr.splitlines() if ln.strip()] or [f"exit {res.returncode}"])[-1]
        out = {"file": None, "error": last.strip()[:200], "pipelines": [], "placeholders": [], "failed": {}}
    return {"missing": {}, **out, "src": str(src)}


def _needs(result: dict) -> str:
    """'; N need packages not installed here: ftfy (4 classes)', or ''."""
    by: dict[str, int] = {}
    for package in result["missing"].values():
        by[package] = by.get(package, 0) + 1
    return (f"; {len(result['missing'])} need packages not installed here: "
            + ", ".join(f"{p} ({n})" for p, n in sorted(by.items()))) if by else ""


def import_ok(result: dict) -> bool:
    return not result["error"] and not result["failed"] and str(result["file"]).startswith(result["src"])


def _counted(n: int) -> str:
    return "no pipeline classes" if n == 0 else f"{n} pipeline class" + ("es" if n > 1 else "")


def import_check(src: Path, required: set | None = None) -> str:
    """One cell: 'ok (N pipeline classes)', or 'FAIL: ...' naming each class that does not import."""
    r = import_pipelines(src, required)
    if r["error"]:
        return "FAIL: " + r["error"][:120].replace("|", "/")
    if not str(r["file"]).startswith(r["src"]):
        return f"FAIL: imported {r['file']} instead"
    total = len(r["pipelines"]) + len(r["failed"]) + len(r["missing"])
    if r["failed"]:
        return (f"FAIL: {len(r['failed'])} of {_counted(total)} do not import: "
                + "; ".join(f"{n}: {w}" for n, w in sorted(r["failed"].items()))).replace("|", "/")
    return f"ok ({_counted(total)}" + (f", {len(r['placeholders'])} placeholders for backends not installed"
                                        if r["placeholders"] else "") + _needs(r) + ")"


def _absent_modules(failed: dict) -> dict[str, list[str]]:
    """{top-level module: [class, ...]} of the failures that are only a module not installed."""
    by: dict[str, list[str]] = {}
    for name, why in failed.items():
        found = re.fullmatch(r"(?:ModuleNotFoundError|RuntimeError): .*No module named '([\w.]+)'\W*", why)
        if found:
            by.setdefault(found.group(1).split(".")[0], []).append(name)
    return by


def import_lines(result: dict) -> list[str]:
    """The import check's report: one line where it passed, else the failures in one block."""
    r, total = result, len(result["pipelines"]) + len(result["failed"]) + len(result["missing"])
    if r["error"]:
        return [f"import: FAILED: import diffusers: {r['error']}"]
    if not str(r["file"]).startswith(r["src"]):
        return [f"import: FAILED: diffusers came from {r['file']}, not from {r['src']}"]
    if r["failed"]:
        absent = _absent_modules(r["failed"])
        head = [f"import: FAILED: {len(r['failed'])} of {_counted(total)} the release exports do not import:"]
        for module, names in sorted(absent.items()):
            head.append(f"  {len(names)} only for want of the module `{module}`, not installed here: install the "
                        "release's requirements (its Requires-Dist), then `fork.py rebase --continue`")
        listed = {n for names in absent.values() for n in names}
        return head + [f"  {n}: {w}" for n, w in sorted(r["failed"].items()) if n not in listed]
    held = (f" ({len(r['placeholders'])} placeholders for backends not installed: {', '.join(r['placeholders'])})"
            if r["placeholders"] else "")
    return [f"import: ok: diffusers and its {_counted(total)}{held}{_needs(r)}" if total
            else "import: ok: diffusers (it exports no pipeline classes)"]


# ---------------------------------------------------------------- command line
def add_parser(sub, root: Path) -> None:
    p = sub.add_parser(
        "rebase", help="move the series onto another upstream release (or --check several)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="*", metavar="TARGET",
                   help="release to rebase onto (0.5.1 or v0.5.1); with --check, releases or ranges (0.4.0..0.14.0)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--continue", dest="cont", action="store_true",
                      help=f"go on after resolving the conflict in {WORK}/tree/; or, once the rebased series is "
                           "written, run its checks again (after a failure or a Ctrl-C)")
    mode.add_argument("--abort", action="store_true", help="drop the rebase in progress; restore everything")
    mode.add_argument("--check", action="store_true",
                      help="apply the series to each release in a scratch folder and print a table; changes nothing")
    p.add_argument("--upstream-repo", metavar="PATH_OR_URL",
                   help="read releases from this upstream git clone's tags instead of the index's release files "
                        "(a rebase still pins the release file, which must hold the same files)")
    p.add_argument("--no-tests", action="store_true",
                   help="rebase, --continue: do not run the project's tests afterwards (about 10 min on 2 cores)")
    p.add_argument("--tests", action="store_true", help="--check: run the project's tests on each release (slow)")
    p.add_argument("--no-import", action="store_true", help="--check: skip the import check")
    p.add_argument("--test-cmd", metavar="CMD",
                   help="test command (default: python -m pytest -q -x tests), run at the root with the tree's src/ "
                        "first on PYTHONPATH")
    p.add_argument("--root", default=str(root), help="project root (default: this checkout)")
    p.set_defaults(func=dispatch)


def dispatch(args) -> int:
    if args.cont or args.abort:
        if args.target:
            raise ForkError(f"--{'continue' if args.cont else 'abort'} takes no TARGET")
        what = "--continue" if args.cont else "--abort"
        with fsutil.locked(args.root, f"rebase {what}"), on_ctrl_c(args.root, what):
            return cmd_continue(args) if args.cont else cmd_abort(args)
    if args.check:
        if not args.target:
            raise ForkError("--check needs releases: e.g. 'rebase --check 0.4.0..0.14.0' or "
                            "'rebase --check 0.5.1 0.6.0'")
        try:
            return cmd_check(args)
        except KeyboardInterrupt:
            raise Interrupted("interrupted (Ctrl-C) during 'rebase --check', which changes nothing") from None
    if len(args.target) != 1:
        raise ForkError("name one TARGET release (e.g. 'rebase 0.5.1'); several are for --check")
    with fsutil.locked(args.root, f"rebase {args.target[0]}"), on_ctrl_c(args.root, args.target[0]):
        return cmd_rebase(args)


@contextlib.contextmanager
def on_ctrl_c(root, what: str):
    """Ctrl-C: Interrupted, its one line saying what the command left and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(interrupted(Path(root), what)) from None
