"""Unified diffs: parse, apply with zero fuzz, and write them back in one stable form.

Pure Python so that a build (``pip install``) needs neither GNU patch nor git. A hunk applies
only where its context and removed lines match exactly ("zero fuzz", as quilt and
ungoogled-chromium's validate_patches.py use it); it may sit at an offset from the line its
header names, and the offset is reported so that ``verify`` can insist on none.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from .fsutil import PREFIX, path_problem

NO_EOL = "\\ No newline at end of file"
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    """A patch that cannot be read or applied; the message names patch, file and hunk."""


@dataclass
class Hunk:
    old_start: int
    new_start: int
    lines: list = field(default_factory=list)  # (tag, text) with tag in " -+"; text keeps its "\n" if any

    def old(self):
        return [t for tag, t in self.lines if tag in " -"]

    def new(self):
        return [t for tag, t in self.lines if tag in " +"]


@dataclass
class FilePatch:
    old_path: str | None  # None for a new file
    new_path: str | None  # None for a deleted file
    hunks: list = field(default_factory=list)

    @property
    def path(self):
        return self.new_path or self.old_path


@dataclass
class Patch:
    header: str  # free text before the first file (DEP-3 fields)
    files: list = field(default_factory=list)

    def field(self, name):
        for line in self.header.splitlines():
            if line.lower().startswith(name.lower() + ":"):
                return line.split(":", 1)[1].strip()
        return None


def _strip_prefix(p):
    if p == "/dev/null":
        return None
    p = p.split("\t", 1)[0]
    return p[2:] if p[:2] in ("a/", "b/") else p


def parse(text: str, name: str = "<patch>") -> Patch:
    lines = text.splitlines(keepends=True)
    i, header = 0, []
    while i < len(lines) and not lines[i].startswith("--- "):
        if lines[i].startswith("diff ") or lines[i].startswith("index "):
            i += 1
            continue
        header.append(lines[i])
        i += 1
    patch = Patch("".join(header).rstrip("\n") + ("\n" if header else ""))
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff ") or line.startswith("index "):
            i += 1
            continue
        if not line.startswith("--- "):
            raise PatchError(f"{name}: line {i + 1}: expected '--- ' file header, got {line.rstrip()!r}")
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"{name}: line {i + 2}: '--- ' not followed by '+++ '")
        fp = FilePatch(_strip_prefix(line[4:].rstrip("\n")), _strip_prefix(lines[i + 1][4:].rstrip("\n")))
        for p in (fp.old_path, fp.new_path):
            problem = None if p is None else path_problem(p, PREFIX)
            if problem:  # a patch writes only inside the package: no '..', no absolute path, no other folder
                raise PatchError(f"{name}: line {i + 1}: file {p!r} {problem}: refused")
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            m = _HUNK.match(lines[i])
            if not m:
                raise PatchError(f"{name}: line {i + 1}: bad hunk header {lines[i].rstrip()!r}")
            old_len = int(m.group(2)) if m.group(2) is not None else 1
            new_len = int(m.group(4)) if m.group(4) is not None else 1
            hunk = Hunk(int(m.group(1)), int(m.group(3)))
            i += 1
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_len or seen_new < new_len):
                body = lines[i]
                tag = body[:1]
                if body.rstrip("\n") == NO_EOL:
                    i += 1
                    continue
                if tag == "\n" or body == "":  # an empty context line some editors strip
                    tag, body = " ", " \n"
                if tag not in " -+":
                    raise PatchError(f"{name}: {fp.path}: hunk {len(fp.hunks) + 1}: unexpected line {body.rstrip()!r}")
                text_ = body[1:]
                i += 1
                if i < len(lines) and lines[i].rstrip("\n") == NO_EOL:
                    text_ = text_.rstrip("\n")
                    i += 1
                hunk.lines.append((tag, text_))
                seen_old += tag in " -"
                seen_new += tag in " +"
            if seen_old != old_len or seen_new != new_len:
                raise PatchError(f"{name}: {fp.path}: hunk {len(fp.hunks) + 1}: truncated "
                                 f"(header says -{old_len} +{new_len})")
            fp.hunks.append(hunk)
        if not fp.hunks and not (fp.old_path is None or fp.new_path is None):
            raise PatchError(f"{name}: {fp.path}: file header with no hunks")
        patch.files.append(fp)
    if not patch.files:
        raise PatchError(f"{name}: no file changes found")
    return patch


@dataclass
class Applied:
    text: str | None  # None: the file is deleted
    offsets: list  # per hunk, the line offset it applied at


def apply_file(fp: FilePatch, text: str | None, name: str = "<patch>") -> Applied:
    """Apply one file's hunks to ``text`` (None: the file does not exist). Zero fuzz."""
    if fp.old_path is None:
        if text is not None:
            raise PatchError(f"{name}: {fp.path}: creates a file that already exists")
        new = "".join(t for h in fp.hunks for t in h.new())
        return Applied(new, [0] * len(fp.hunks))
    if text is None:
        raise PatchError(f"{name}: {fp.path}: file to patch does not exist")
    out, offsets = apply_hunks(fp, text)
    if None in offsets:
        n = offsets.index(None) + 1
        h = fp.hunks[n - 1]
        ctx = "".join(h.old()[:6]).rstrip("\n")
        raise PatchError(
            f"{name}: {fp.path}: hunk {n} ({hunk_header(h)}) does not apply with zero fuzz; "
            f"expected these lines near line {h.old_start}:\n{ctx}"
        )
    if fp.new_path is None:
        if out:
            raise PatchError(f"{name}: {fp.path}: deletes a file but lines would remain")
        return Applied(None, offsets)
    return Applied(out, offsets)


def hunk_header(h: Hunk) -> str:
    return f"@@ -{h.old_start},{len(h.old())} +{h.new_start},{len(h.new())} @@"


def apply_hunks(fp: FilePatch, text: str) -> tuple[str, list]:
    """Apply each hunk of ``fp`` that matches ``text`` exactly (zero fuzz), skipping those that do not,
    as GNU patch does before writing a .rej. Returns the text and, per hunk, its offset or None."""
    src = text.splitlines(keepends=True)
    out, pos, delta, offsets = [], 0, 0, []
    for h in fp.hunks:
        old = h.old()
        # a pure insertion's header names the line after which it goes; otherwise its first line
        want = h.old_start if not old else max(h.old_start - 1, 0)
        found = _find(src, old, want + delta, pos)
        if found is None:
            offsets.append(None)
            continue
        offsets.append(found - want)
        out.extend(src[pos:found])
        out.extend(h.new())
        pos = found + len(old)
        delta = found - want
    out.extend(src[pos:])
    return "".join(out), offsets


def apply_hunks_fuzzy(fp: FilePatch, text: str, max_fuzz: int = 3) -> tuple[str | None, list]:
    """Like GNU patch's fuzz: a hunk whose context no longer matches may drop up to ``max_fuzz`` context
    lines at its start, its end, or both, keeping at least two lines to anchor it, and must then match at
    exactly one place in the file (never a guess between two). Returns (text, per hunk the context lines
    dropped), or (None, ...) when a hunk finds no single place."""
    src = text.splitlines(keepends=True)
    edits, fuzz = [], []
    for h in fp.hunks:
        lines = h.lines
        lead_ctx = next((i for i, (t, _) in enumerate(lines) if t != " "), 0)
        tail_ctx = next((i for i, (t, _) in enumerate(reversed(lines)) if t != " "), 0)
        tries = [(min(a, lead_ctx), min(b, tail_ctx)) for f in range(max_fuzz + 1) for a, b in ((f, 0), (0, f), (f, f))]
        for a, b in dict.fromkeys(tries):
            kept = lines[a:len(lines) - b]
            old = [t for tag, t in kept if tag in " -"]
            if len(old) < 2:
                continue
            places = [i for i in range(len(src) - len(old) + 1) if src[i:i + len(old)] == old]
            if len(places) == 1:
                edits.append((places[0], len(old), [t for tag, t in kept if tag in " +"]))
                fuzz.append(a + b)
                break
        else:
            return None, fuzz + [None]
    edits.sort()
    if any(a[0] + a[1] > b[0] for a, b in zip(edits, edits[1:])):
        return None, fuzz  # two hunks claim the same lines
    out, pos = [], 0
    for start, n, new in edits:
        out.extend(src[pos:start])
        out.extend(new)
        pos = start + n
    out.extend(src[pos:])
    return "".join(out), fuzz


def _find(src, old, want, lo):
    """The start index nearest to ``want`` (at or after ``lo``) where ``old`` matches exactly."""
    n = len(old)
    hi = len(src) - n
    if hi < lo:
        return None
    want = min(max(want, lo), hi)
    for d in range(0, max(want - lo, hi - want) + 1):
        for start in (want - d, want + d) if d else (want,):
            if lo <= start <= hi and src[start:start + n] == old:
                return start
    return None


def apply(patch: Patch, files: dict, name: str = "<patch>", strict: bool = False) -> tuple[dict, list]:
    """Apply ``patch`` to ``files`` (path -> text). Returns the new mapping and notes on offsets.
    With ``strict`` an offset is an error too (our own series is kept with none)."""
    files = dict(files)
    notes = []
    for fp in patch.files:
        res = apply_file(fp, files.get(fp.old_path) if fp.old_path else None, name)
        for n, off in enumerate(res.offsets, 1):
            if off:
                msg = f"{name}: {fp.path}: hunk {n} applies at offset {off:+d} lines"
                if strict:
                    raise PatchError(msg + " (run 'fork.py refresh' to re-anchor it)")
                notes.append(msg)
        if fp.old_path and fp.old_path != fp.new_path:
            files.pop(fp.old_path, None)
        if res.text is None:
            files.pop(fp.path, None)
        else:
            files[fp.new_path] = res.text
    return files, notes


def diff_file(path: str, old: str | None, new: str | None, context: int = 3) -> str:
    """One file's diff in the one form ``refresh`` writes (stable: same inputs, same bytes)."""
    if old == new:
        return ""
    a = (old or "").splitlines(keepends=True)
    b = (new or "").splitlines(keepends=True)
    out = [f"--- {'a/' + path if old is not None else '/dev/null'}\n",
           f"+++ {'b/' + path if new is not None else '/dev/null'}\n"]
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        out.append(f"@@ -{_range(i1, i2)} +{_range(j1, j2)} @@\n")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out.extend(_emit(" ", a[a1:a2]))
                continue
            out.extend(_emit("-", a[a1:a2]))
            out.extend(_emit("+", b[b1:b2]))
    return "".join(out)


def _range(start, stop):
    length = stop - start
    first = start + 1 if length else start
    return f"{first}" if length == 1 else f"{first},{length}"


def _emit(tag, lines):
    for line in lines:
        if line.endswith("\n"):
            yield tag + line
        else:
            yield tag + line + "\n"
            yield NO_EOL + "\n"


def set_field(header: str, name: str, value: str) -> str:
    """``header`` with its DEP-3 field ``name`` set to ``value`` (appended if absent)."""
    lines = header.rstrip("\n").splitlines()
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            lines[i] = f"{name}: {value}"
            break
    else:
        lines.append(f"{name}: {value}")
    return "\n".join(lines) + "\n"


def render(header: str, diffs: list) -> str:
    head = header.rstrip("\n") + "\n\n" if header.strip() else ""
    return head + "".join(diffs)


def render_file(fp: FilePatch) -> str:
    """One file's diff as parsed (a .rej of hunks that found no place)."""
    out = [f"--- {'a/' + fp.old_path if fp.old_path else '/dev/null'}\n",
           f"+++ {'b/' + fp.new_path if fp.new_path else '/dev/null'}\n"]
    for h in fp.hunks:
        out.append(hunk_header(h) + "\n")
        for tag, text in h.lines:
            out.extend(_emit(tag, [text]))
    return "".join(out)
