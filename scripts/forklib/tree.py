"""The laid-down tree: pristine upstream + the patch series, beside our own tracked modules.

``src/diffusers/`` holds two kinds of file. Ours are tracked by git. Upstream's are laid down by
``materialize`` from the pinned release with the series applied; they are listed in a manifest
(``src/diffusers/.upstream-manifest.json``, with the sha256 of what was written) and in a
generated ``src/diffusers/.gitignore``, so git never sees them.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from . import fsutil, patchfile, variants
from .release import PREFIX, ForkError, describe, fork_version, load_pin, pristine

MANIFEST = PREFIX + ".upstream-manifest.json"
GITIGNORE = PREFIX + ".gitignore"
VERSION_FILE = PREFIX + "_fork_version.py"
GENERATED = (MANIFEST, GITIGNORE, VERSION_FILE)
NEW_HEADER = """Description: {topic}
 (what this patch changes, and why)
Origin: diffusers-flash
Forwarded: not-needed
Applies-To: {version}
"""


def _sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def read(root: Path, rel: str) -> str | None:
    """The file's text (UTF-8; a file that is not is a ForkError naming it), or None where there is none."""
    p = Path(root) / rel
    return fsutil.read_text(p, rel) if p.is_file() else None


def write(root: Path, rel: str, text: str, durable: bool = False) -> bool:
    """Write ``root/rel`` atomically (a temporary file renamed into place), only where its content differs.
    A path under src/diffusers/ must stay inside it, symlinks resolved; any other inside ``root``. True
    when written."""
    p = fsutil.confined(root, rel, PREFIX if rel.startswith(PREFIX) else "")
    return fsutil.write_if_changed(p, text.encode("utf-8"), durable)


def remove(root: Path, rel: str) -> bool:
    """Remove a laid-down file (its path confined to src/diffusers/). True when there was one."""
    p = fsutil.confined(root, rel, PREFIX)
    if p.is_file() or p.is_symlink():
        p.unlink()
        return True
    return False


# ---------------------------------------------------------------- the series
def series(root: Path) -> list:
    path = Path(root) / "patches" / "series"
    if not path.exists():
        raise ForkError(f"{path} is missing")
    names = [ln.split("#", 1)[0].strip() for ln in fsutil.read_text(path, "patches/series").splitlines()]
    return [fsutil.check_patch_name(n, "patches/series entry") for n in names if n]


def load_patches(root: Path, names: list | None = None) -> list:
    """(name, Patch) for each patch in the series, in order; a missing or unreadable file is named."""
    out = []
    for name in names if names is not None else series(root):
        path = Path(root) / "patches" / name
        if not path.is_file():
            raise ForkError(f"patch {name} is listed in patches/series but {path} is missing")
        out.append((name, patchfile.parse(fsutil.read_text(path, f"patches/{name}"), name)))
    return out


def apply_series(files: dict, patches: list, strict: bool = False) -> tuple[dict, list]:
    """Apply each patch in turn; ``patchfile.PatchError`` names the first that fails."""
    notes = []
    for name, patch in patches:
        files, n = patchfile.apply(patch, files, name, strict=strict)
        notes.extend(n)
    return files, notes


def expected_tree(root: Path, strict: bool = False) -> tuple[dict, dict, list]:
    """(pristine, pristine + series, notes)."""
    pin = load_pin(root)
    base = pristine(root, pin)
    try:
        files, notes = apply_series(base, variants.active(load_patches(root), pin["version"]), strict=strict)
    except patchfile.PatchError as e:
        raise ForkError(str(e)) from None
    return base, files, notes


# ---------------------------------------------------------------- laid-down files
class ManifestDamaged(ForkError):
    """The manifest of laid-down files is not what materialize writes (a kill mid-write, a hand edit)."""


def manifest(root: Path) -> dict:
    """What materialize laid down: {"upstream": version, "files": {path: sha256}}. ManifestDamaged (with the
    way out) when it cannot be read or names a path outside src/diffusers/."""
    try:
        text = read(root, MANIFEST)
        if not text:
            return {"upstream": None, "files": {}}
        man = json.loads(text)
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ValueError("not a manifest")
        for rel, digest in man["files"].items():
            fsutil.check_path(rel, PREFIX, "file")
            if not fsutil.is_sha256(digest):
                raise ValueError(f"{rel}: no sha256")
    except (ValueError, ForkError) as e:
        raise ManifestDamaged(f"{MANIFEST} is damaged ({str(e).splitlines()[0][:120]}): run 'fork.py materialize "
                              "--force' to lay the upstream files down again") from None
    return man


def tracked(root: Path) -> set:
    """Files under src/diffusers that git tracks (ours); empty outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", PREFIX],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {p for p in out.split("\0") if p}


def ours(root: Path) -> list:
    """Our own files under src/diffusers: everything there that materialize did not lay down."""
    laid = set(manifest(root)["files"]) | set(GENERATED)
    base = Path(root) / PREFIX
    if not base.exists():
        return []
    return sorted(
        p.relative_to(root).as_posix() for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        and p.relative_to(root).as_posix() not in laid
    )


def hand_edits(root: Path, expected: dict | None = None) -> list:
    """Laid-down files whose content is neither what was laid down nor (if given) what would be."""
    out = []
    for rel, digest in manifest(root)["files"].items():
        now = _sha(read(root, rel))
        if now != digest and (expected is None or now != _sha(expected.get(rel))):
            out.append(rel)
    return sorted(out)


def _raw(root: Path, rel: str) -> bytes | None:
    p = Path(root) / rel
    return p.read_bytes() if p.is_file() and not p.is_symlink() else None


def version_file(pin: dict) -> str:
    return f'# generated by scripts/fork.py materialize\n__version__ = "{fork_version(pin)}"\n'


def manifest_text(version: str, files: dict) -> str:
    return json.dumps({"upstream": version, "files": {p: _sha(t) for p, t in sorted(files.items())}},
                      indent=1, sort_keys=True) + "\n"


def generated(pin: dict, files: dict) -> dict:
    """The files materialize generates beside the laid-down ones (path -> text), given pristine + series."""
    ignore = ["# generated by scripts/fork.py materialize: upstream files laid down from the pin"]
    ignore += ["/" + p[len(PREFIX):] for p in sorted(set(files) | set(GENERATED))]
    return {VERSION_FILE: version_file(pin), GITIGNORE: "\n".join(ignore) + "\n",
            MANIFEST: manifest_text(pin["version"], files)}


def materialize(root: Path, force: bool = False, log=print) -> dict:
    """Lay pristine upstream + series into src/diffusers. Idempotent; keeps hand edits unless forced.
    Holds the project's lock (``fsutil.locked``); writes only files whose content differs."""
    with fsutil.locked(root, "materialize" + (" --force" if force else "")):
        return _materialize(Path(root), force, log)


def _materialize(root: Path, force: bool, log) -> dict:
    pin = load_pin(root)
    _, files, notes = expected_tree(root)
    for n in notes:
        log(f"warning: {n}")
    for rel in files:
        fsutil.confined(root, rel)  # nothing is written until every path is known to stay inside
    try:
        old = manifest(root)
    except ManifestDamaged as e:
        if not force:
            raise
        log(f"warning: {str(e).split(':', 1)[0]}: laying every upstream file down again (files of another "
            "release left over, if any, stay)")
        old = {"upstream": None, "files": {}}
    mine = tracked(root)
    shadows = sorted(p for p in files if (root / p).exists() and p not in old["files"])
    if shadows:
        ours_shadowing = [p for p in shadows if p in mine]
        if ours_shadowing or not force:
            raise ForkError(
                "file(s) not laid down by materialize stand where upstream has a file: "
                + ", ".join(ours_shadowing or shadows)
                + (" (tracked: ours may not shadow upstream; rename them)" if ours_shadowing
                   else " (use --force to overwrite them)")
            )
    edited = hand_edits(root, files) if old["files"] else []
    if edited and not force:
        raise ForkError(
            "hand edits to laid-down upstream files would be overwritten: " + ", ".join(edited)
            + "\n  keep them as patches with 'fork.py refresh', or discard them with 'materialize --force'"
        )
    changed = 0
    for rel in sorted(set(old["files"]) - set(files)):  # left over from another pin or series
        changed += remove(root, rel)
    for rel, text in sorted(files.items()):
        if _raw(root, rel) != text.encode("utf-8"):
            write(root, rel, text)
            changed += 1
    for rel, text in generated(pin, files).items():  # the manifest last: it records what is now laid down
        write(root, rel, text, durable=rel == MANIFEST)
    log(f"materialized {describe(pin)} + {series_count(root, pin)} into {PREFIX} ({changed} file(s) written)")
    return {"changed": changed, "files": len(files)}


# ---------------------------------------------------------------- refresh
def refresh(root: Path, new_patch: str | None = None, log=print) -> list:
    """Turn edits in the laid-down tree back into patch files. Returns the patches rewritten.

    Without ``new_patch`` each edited file's change goes to the last patch in the series that touches
    that file. With it, every edit goes to ``new_patch`` (created and appended to the series if new),
    moved beneath later patches that touch the same file where they still apply on top of it.
    Holds the project's lock.
    """
    if new_patch is not None:
        fsutil.check_patch_name(new_patch, "--patch")
    with fsutil.locked(root, "refresh" + (f" --patch {new_patch}" if new_patch else "")):
        return _refresh(Path(root), new_patch, log)


def _refresh(root: Path, new_patch: str | None, log) -> list:
    pin = load_pin(root)
    base = pristine(root, pin)
    listed = series(root)
    patches = dict(variants.active(load_patches(root, listed), pin["version"]))
    names = [n for n in listed if n in patches]  # a patch upstream has since the pin takes no part
    states, state = [], base
    last = {}
    for k, name in enumerate(names):
        states.append(state)
        try:
            state, _ = patchfile.apply(patches[name], state, name)
        except patchfile.PatchError as e:
            raise ForkError(f"{e}\n  (refresh needs the series to apply; fix that patch by hand first)") from None
        for fp in patches[name].files:
            last[fp.path] = k
    final = state
    laid = manifest(root)["files"] or final
    disk = {rel: read(root, rel) for rel in set(laid) | set(final)}
    changed = sorted(rel for rel in disk if disk[rel] != final.get(rel))
    # with --patch every edit goes there (quilt's top patch); else to the last patch touching its file
    orphans = changed if new_patch else [rel for rel in changed if rel not in last]
    if orphans:
        if not new_patch:
            raise ForkError("edited file(s) that no patch touches: " + ", ".join(orphans)
                            + "\n  name the patch to hold them: 'fork.py refresh --patch NNNN-topic.patch'")
        if new_patch not in patches:
            names.append(new_patch)
            listed.append(new_patch)
            from .patchfile import Patch
            topic = new_patch[5:-6].replace("-", " ")
            patches[new_patch] = Patch(NEW_HEADER.format(topic=topic, version=pin["version"]))
            states.append(final)
            write(root, "patches/series", "".join(n + "\n" for n in listed))
        k = names.index(new_patch)
        below = [rel for rel in orphans if last.get(rel, -1) > k]
        if below:  # a later patch touches these files too: carry the edits down to patch k, then refresh again
            _sink(root, names, patches, states, final, disk, k, below)
            log(f"refreshed: {new_patch} (the edits to {', '.join(below)} sit beneath later patches)")
            return [new_patch] + _refresh(root, new_patch if len(below) < len(orphans) else None, log)
        for rel in orphans:
            last[rel] = k
    rewritten = []
    for k, name in enumerate(names):
        touched = sorted({fp.path for fp in patches[name].files} | {r for r in orphans if last[r] == k})
        before = states[k]
        after, _ = patchfile.apply(patches[name], before, name) if patches[name].files else (before, [])
        target = {rel: disk.get(rel) if last.get(rel) == k else after.get(rel) for rel in touched}
        text = patch_text(patches[name].header, before, target, touched)
        if text is None:
            raise ForkError(f"{name} would be empty after refresh: remove it from patches/series")
        if write(root, f"patches/{name}", text):
            rewritten.append(name)
    # the refreshed patches now produce what is on disk: record it as laid down
    man = manifest(root)
    man["files"] = {rel: _sha(text) for rel, text in sorted(disk.items()) if text is not None}
    write(root, MANIFEST, json.dumps(man, indent=1, sort_keys=True) + "\n", durable=True)  # where it differs
    if write_patches_doc(root):
        rewritten.append("PATCHES.md")
    log(f"refreshed: {', '.join(rewritten) if rewritten else 'nothing changed'}")
    for name, vs in variants.load(root, [n for n in rewritten if n in names]).items():
        log(f"warning: {name} has variants ({', '.join(v['rel'] for v in vs)}), written against its old text: "
            "make the same change in them, or delete those the main patch now reaches by rebase (rebase --check)")
    return rewritten


def patch_text(header: str, before: dict, after: dict, paths) -> str | None:
    """The patch (in refresh's one stable form) taking ``before`` to ``after`` on ``paths``; None if empty."""
    diffs = [d for rel in sorted(paths) if (d := patchfile.diff_file(rel, before.get(rel), after.get(rel)))]
    return patchfile.render(header, diffs) if diffs else None


def _sink(root, names, patches, states, final, disk, k, files):
    """Rewrite patch k so that it makes the edits (final -> disk) to ``files``, which later patches also
    touch: each edit is moved below them and must come out the same once they apply on top of it."""
    name, after = names[k], (states[k + 1] if k + 1 < len(states) else final)
    moved = {}
    for rel in files:
        if disk[rel] is None:
            raise ForkError(f"{rel}: deleting a file that later patches touch cannot go into {name}")
        edit = patchfile.parse(patchfile.diff_file(rel, final[rel], disk[rel]), "your edit").files[0]
        try:
            text = patchfile.apply_file(edit, after.get(rel), "your edit").text
            chain = {rel: text}
            for later in names[k + 1:]:
                for fp in patches[later].files:
                    if fp.path == rel:
                        chain, _ = patchfile.apply(patchfile.Patch("", [fp]), chain, later)
        except patchfile.PatchError as e:
            raise ForkError(f"{rel}: the edit cannot be moved below the later patches that touch it ({e})") from None
        if chain.get(rel) != disk[rel]:
            raise ForkError(f"{rel}: the edit does not survive the later patches that touch it; put it in the last one")
        moved[rel] = text
    touched = {fp.path for fp in patches[name].files} | set(moved)
    text = patch_text(patches[name].header, states[k], {**after, **moved}, touched)
    write(root, f"patches/{name}", text)


# ---------------------------------------------------------------- verify
# Our own code lives in one package no upstream release has (checked against the tags 0.4.0 to 0.40.0);
# outside it only thin aliases for earlier import paths, each at a path the pinned release does not have.
NAMESPACE = PREFIX + "flash/"
ALIASES = {PREFIX + "models/attention_dispatch.py"}  # upstream has its own from 0.35: a rebase there drops ours


def namespace_problems(mine: set, base: dict) -> list:
    """Files of ours outside ``NAMESPACE`` (and not a listed alias), and upstream files inside it."""
    out = [f"{p}: a file of ours outside {NAMESPACE} (our code lives there; see ALIASES in forklib/tree.py)"
           for p in sorted(mine) if not p.startswith(NAMESPACE) and p not in ALIASES]
    out += [f"{p}: the pinned release has a file in our namespace {NAMESPACE}: ours would clash with it"
            for p in sorted(base) if p.startswith(NAMESPACE)]
    return out


def verify(root: Path, docs: bool = True) -> list:
    """Problems found (empty: the tree is exactly pristine + series, and the series is clean)."""
    root = Path(root)
    problems = []
    pin = load_pin(root)
    base = pristine(root, pin)  # raises on a hash mismatch, naming file, expected and actual
    pdir = root / "patches"
    try:
        names = series(root)
    except ForkError as e:
        return [str(e)]
    on_disk = sorted(p.name for p in pdir.glob("*.patch"))
    problems += [f"patch file {n} is not listed in patches/series" for n in on_disk if n not in names]
    problems += [f"patches/series lists {n} but patches/{n} is missing" for n in names if not (pdir / n).is_file()]
    if len(set(names)) != len(names):
        problems.append("patches/series lists a patch twice")
    files = base
    for name in names:
        if not (pdir / name).is_file():
            continue
        try:
            patch = patchfile.parse(fsutil.read_text(pdir / name, f"patches/{name}"), name)
            if not patch.field("Description"):
                problems.append(f"{name}: no 'Description:' header (DEP-3)")
            problems += since_problems(root, name, patch)
            if variants.skipped(patch, pin["version"]):
                continue  # upstream has it on the pinned release: not applied, kept for older ones
            files, _ = patchfile.apply(patch, files, name, strict=True)
        except ForkError as e:
            problems.append(f"{name}: {e}")
        except patchfile.PatchError as e:
            problems.append(f"{e}")
            return problems
    try:
        man = manifest(root)
    except ManifestDamaged as e:
        return [*problems, str(e)]
    if not man["files"]:
        problems.append(f"nothing is laid down in {PREFIX}: run 'python scripts/fork.py materialize'")
        return problems
    for rel in sorted(set(files) | set(man["files"])):
        now = read(root, rel)
        if rel not in files:
            problems.append(f"{rel}: laid down but not part of pristine + series (stale: run materialize)")
        elif now is None:
            problems.append(f"{rel}: missing (pristine + series has it)")
        elif now != files[rel]:
            problems.append(f"{rel}: differs from pristine + series "
                            "(a hand edit? 'fork.py refresh' keeps it as a patch)")
        elif rel not in man["files"]:
            problems.append(f"{rel}: upstream file not recorded as laid down (a file of ours shadowing it?)")
    if not problems:  # the generated files (the version module the package imports, .gitignore, manifest)
        for rel, text in generated(pin, files).items():
            if _raw(root, rel) != text.encode("utf-8"):
                problems.append(f"{rel}: not what materialize generates (edited?): run 'fork.py materialize --force'")
    problems += variants.problems(root, names)
    mine = tracked(root)
    problems += [f"{p}: a file of ours shadows the upstream file of the same path" for p in sorted(mine & set(base))]
    problems += namespace_problems(mine, base)
    if docs:
        doc = read(root, "PATCHES.md") or ""
        problems += [f"PATCHES.md does not describe {n}" for n in names if n not in doc]
        if not problems and patches_doc(root) not in doc:
            problems.append("PATCHES.md's series section is out of date with the patch headers: run 'fork.py refresh'")
    return problems


def status_line(root: Path) -> str:
    pin = load_pin(root)
    return f"{describe(pin)}; fork version {fork_version(pin)}; {series_count(root, pin)}"


def series_count(root: Path, pin: dict) -> str:
    """'8 patches', or '8 patches, 7 applied (0008 upstream since 0.7.0)' where upstream has some."""
    try:
        patches = load_patches(root)
        out = [f"{n[:4]} upstream since {variants.since(p)}" for n, p in patches if variants.skipped(p, pin["version"])]
    except (ForkError, patchfile.PatchError):  # a missing or broken patch, or a bad series: verify names it
        try:
            return f"{len(series(root))} patches"
        except ForkError:
            return "a series that cannot be read"
    return f"{len(patches)} patches" + (f", {len(patches) - len(out)} applied ({', '.join(out)})" if out else "")


def since_problems(root: Path, name: str, patch) -> list:
    """Upstream-Since must be a release, the same in the patch and each of its variants (a variant that
    becomes the main patch on a rebase carries it on)."""
    mine = variants.since(patch)
    out = []
    for v in variants.load(root, [name]).get(name, []):
        try:
            theirs = variants.since(v["patch"])
        except ForkError as e:
            out.append(f"patches/{v['rel']}: {e}")
            continue
        if theirs != mine:
            out.append(f"patches/{v['rel']}: {variants.SINCE} {theirs or '(none)'} but {name} says {mine or '(none)'}; "
                       "a patch and its variants must agree")
    return out


# ---------------------------------------------------------------- PATCHES.md, written from the headers
DOC_BEGIN = "<!-- series: generated by 'scripts/fork.py refresh' from the patch headers; do not edit -->"
DOC_END = "<!-- end of series -->"


def patches_doc(root: Path) -> str:
    out = [DOC_BEGIN, ""]
    names = series(root)
    found = variants.load(root, names)
    for name, patch in load_patches(root, names):
        desc = (patch.field("Description") or "").strip()
        body = []
        for line in patch.header.splitlines()[1:]:
            if line.startswith(" "):
                body.append(line.strip())
            else:
                break
        files = sorted({fp.path[len(PREFIX):] for fp in patch.files})
        changed = sum(1 for fp in patch.files for h in fp.hunks for tag, _ in h.lines if tag in "+-")
        out += [f"### {name}", f"**{desc}**", "", " ".join(body), "",
                f"- Applies to upstream: {patch.field('Applies-To') or '?'}",
                f"- Upstream status: {patch.field('Forwarded') or '?'}",
                f"- Touches ({changed} changed lines): {', '.join(files)}"]
        if variants.since(patch):
            out.append(f"- Upstream since: {variants.since(patch)} (not applied on that release and later; "
                       "kept in the series for the older ones)")
        out += [f"- Variant for {v['applies']}: `patches/{v['rel']}`" for v in found.get(name, [])]
        out.append("")
    out.append(DOC_END)
    return "\n".join(out)


def write_patches_doc(root: Path) -> bool:
    path = Path(root) / "PATCHES.md"
    empty = "# Patches\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    text = fsutil.read_text(path, "PATCHES.md") if path.exists() else empty
    if DOC_BEGIN not in text or DOC_END not in text:
        text = text.rstrip("\n") + "\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    return write(root, "PATCHES.md", head + patches_doc(root) + tail)
