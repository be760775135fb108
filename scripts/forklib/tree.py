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

from . import patchfile
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
    p = Path(root) / rel
    return p.read_bytes().decode("utf-8") if p.is_file() else None


def write(root: Path, rel: str, text: str) -> None:
    p = Path(root) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode("utf-8"))


# ---------------------------------------------------------------- the series
def series(root: Path) -> list:
    path = Path(root) / "patches" / "series"
    if not path.exists():
        raise ForkError(f"{path} is missing")
    names = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [n for n in names if n]


def load_patches(root: Path, names: list | None = None) -> list:
    """(name, Patch) for each patch in the series, in order; a missing or unreadable file is named."""
    out = []
    for name in names if names is not None else series(root):
        path = Path(root) / "patches" / name
        if not path.is_file():
            raise ForkError(f"patch {name} is listed in patches/series but {path} is missing")
        out.append((name, patchfile.parse(path.read_text(), name)))
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
        files, notes = apply_series(base, load_patches(root), strict=strict)
    except patchfile.PatchError as e:
        raise ForkError(str(e)) from None
    return base, files, notes


# ---------------------------------------------------------------- laid-down files
def manifest(root: Path) -> dict:
    text = read(root, MANIFEST)
    return json.loads(text) if text else {"upstream": None, "files": {}}


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


def materialize(root: Path, force: bool = False, log=print) -> dict:
    """Lay pristine upstream + series into src/diffusers. Idempotent; keeps hand edits unless forced."""
    root = Path(root)
    pin = load_pin(root)
    _, files, notes = expected_tree(root)
    for n in notes:
        log(f"warning: {n}")
    old = manifest(root)
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
    edited = hand_edits(root, files)
    if edited and not force:
        raise ForkError(
            "hand edits to laid-down upstream files would be overwritten: " + ", ".join(edited)
            + "\n  keep them as patches with 'fork.py refresh', or discard them with 'materialize --force'"
        )
    changed = 0
    for rel in sorted(set(old["files"]) - set(files)):  # left over from another pin or series
        if (root / rel).exists():
            (root / rel).unlink()
            changed += 1
    for rel, text in sorted(files.items()):
        if read(root, rel) != text:
            write(root, rel, text)
            changed += 1
    write(root, VERSION_FILE, f'# generated by scripts/fork.py materialize\n__version__ = "{fork_version(pin)}"\n')
    write(root, MANIFEST, json.dumps({"upstream": pin["version"], "files": {p: _sha(t) for p, t in sorted(files.items())}},
                                     indent=1, sort_keys=True) + "\n")
    ignore = ["# generated by scripts/fork.py materialize: upstream files laid down from the pin"]
    ignore += ["/" + p[len(PREFIX):] for p in sorted(set(files) | set(GENERATED))]
    write(root, GITIGNORE, "\n".join(ignore) + "\n")
    log(f"materialized {describe(pin)} + {len(series(root))} patches into {PREFIX} ({changed} file(s) written)")
    return {"changed": changed, "files": len(files)}


# ---------------------------------------------------------------- refresh
def refresh(root: Path, new_patch: str | None = None, log=print) -> list:
    """Turn edits in the laid-down tree back into patch files. Returns the patches rewritten.

    Without ``new_patch`` each edited file's change goes to the last patch in the series that touches
    that file. With it, every edit goes to ``new_patch`` (created and appended to the series if new),
    moved beneath later patches that touch the same file where they still apply on top of it.
    """
    root = Path(root)
    pin = load_pin(root)
    base = pristine(root, pin)
    names = series(root)
    patches = dict(load_patches(root, names))
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
            from .patchfile import Patch
            patches[new_patch] = Patch(NEW_HEADER.format(topic=new_patch[5:-6].replace("-", " "), version=pin["version"]))
            states.append(final)
            (root / "patches" / "series").write_text("".join(n + "\n" for n in names))
        k = names.index(new_patch)
        below = [rel for rel in orphans if last.get(rel, -1) > k]
        if below:  # a later patch touches these files too: carry the edits down to patch k, then refresh again
            _sink(root, names, patches, states, final, disk, k, below)
            return refresh(root, new_patch if len(below) < len(orphans) else None, log)
        for rel in orphans:
            last[rel] = k
    rewritten = []
    for k, name in enumerate(names):
        touched = sorted({fp.path for fp in patches[name].files} | {r for r in orphans if last[r] == k})
        before = states[k]
        after, _ = patchfile.apply(patches[name], before, name) if patches[name].files else (before, [])
        diffs = []
        for rel in touched:
            new = disk.get(rel) if last.get(rel) == k else after.get(rel)
            d = patchfile.diff_file(rel, before.get(rel), new)
            if d:
                diffs.append(d)
        if not diffs:
            raise ForkError(f"{name} would be empty after refresh: remove it from patches/series")
        text = patchfile.render(patches[name].header, diffs)
        path = root / "patches" / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            rewritten.append(name)
    # the refreshed patches now produce what is on disk: record it as laid down
    man = manifest(root)
    for rel in changed:
        if disk[rel] is None:
            man["files"].pop(rel, None)
        else:
            man["files"][rel] = _sha(disk[rel])
    if changed:
        write(root, MANIFEST, json.dumps(man, indent=1, sort_keys=True) + "\n")
    if write_patches_doc(root):
        rewritten.append("PATCHES.md")
    log(f"refreshed: {', '.join(rewritten) if rewritten else 'nothing changed'}")
    return rewritten


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
    touched = sorted({fp.path for fp in patches[name].files} | set(moved))
    diffs = [patchfile.diff_file(rel, states[k].get(rel), moved.get(rel, after.get(rel))) for rel in touched]
    (Path(root) / "patches" / name).write_text(patchfile.render(patches[name].header, [d for d in diffs if d]))


# ---------------------------------------------------------------- verify
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
            patch = patchfile.parse((pdir / name).read_text(), name)
            if not patch.field("Description"):
                problems.append(f"{name}: no 'Description:' header (DEP-3)")
            files, _ = patchfile.apply(patch, files, name, strict=True)
        except patchfile.PatchError as e:
            problems.append(f"{e}")
            return problems
    man = manifest(root)
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
            problems.append(f"{rel}: differs from pristine + series (a hand edit? 'fork.py refresh' keeps it as a patch)")
        elif rel not in man["files"]:
            problems.append(f"{rel}: upstream file not recorded as laid down (a file of ours shadowing it?)")
    mine = tracked(root)
    problems += [f"{p}: a file of ours shadows the upstream file of the same path" for p in sorted(mine & set(base))]
    if docs:
        doc = read(root, "PATCHES.md") or ""
        problems += [f"PATCHES.md does not describe {n}" for n in names if n not in doc]
        if not problems and patches_doc(root) not in doc:
            problems.append("PATCHES.md's series section is out of date with the patch headers: run 'fork.py refresh'")
    return problems


def status_line(root: Path) -> str:
    pin = load_pin(root)
    return f"{describe(pin)}; fork version {fork_version(pin)}; {len(series(root))} patches"


# ---------------------------------------------------------------- PATCHES.md, written from the headers
DOC_BEGIN = "<!-- series: generated by 'scripts/fork.py refresh' from the patch headers; do not edit -->"
DOC_END = "<!-- end of series -->"


def patches_doc(root: Path) -> str:
    out = [DOC_BEGIN, ""]
    for name, patch in load_patches(root):
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
                f"- Touches ({changed} changed lines): {', '.join(files)}", ""]
    out.append(DOC_END)
    return "\n".join(out)


def write_patches_doc(root: Path) -> bool:
    path = Path(root) / "PATCHES.md"
    text = path.read_text() if path.exists() else "# Patches\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    if DOC_BEGIN not in text or DOC_END not in text:
        text = text.rstrip("\n") + "\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    new = head + patches_doc(root) + tail
    if new != text:
        path.write_text(new)
        return True
    return False
