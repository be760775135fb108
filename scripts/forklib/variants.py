"""Series variants: alternative texts of a patch for the upstream releases the main text cannot serve.

``patches/variants/<patch name without .patch>/<release>.patch`` is the same change written for another
release: a full patch with its own DEP-3 header, whose ``Applies-To`` says which releases it serves, as a
list of versions and inclusive ranges (``0.4.0..0.4.1, 0.6.0``). ``rebase V`` takes, for each patch of the
series, the variant whose Applies-To covers V if there is one (it must apply there as written, offsets and
fuzz aside), else the main patch with the three-way merge and fuzz. When the rebase finishes, every patch
whose text changed keeps its old text as the variant for the release it came from
(``variants/<name>/<old release>.patch``, byte for byte; under the name the project's history gave those
bytes where they were a variant before, e.g. 0.42.1.patch serving 0.40.0..0.42.1) unless the rebase back
would make that text again by itself or from the variant serving the old release, and a variant that was
used becomes the main patch (its file is removed from variants/). So a rebase there and back, or through
several releases, restores the series byte for byte,
and a release resolved once by hand (``rebase --continue``) needs no hand the next time.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import fsutil, patchfile
from .release import ForkError

DIR = "variants"
_ITEM = re.compile(r"^v?(\d+(?:\.\d+)*)(?:\s*\.\.\s*v?(\d+(?:\.\d+)*))?$")


def vkey(version: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def parse_applies(text: str | None) -> list:
    """``Applies-To`` as a list of (low, high) inclusive version keys; ForkError on a malformed item."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if not m:
            raise ForkError(f"Applies-To item {item!r} is neither a version (0.4.1) nor a range (0.4.0..0.4.1)")
        out.append((vkey(m.group(1)), vkey(m.group(2) or m.group(1))))
    return out


def covers(applies: str | None, version: str) -> bool:
    key = vkey(version)
    return any(lo <= key <= hi for lo, hi in parse_applies(applies))


def stem(name: str) -> str:
    return name[:-len(".patch")] if name.endswith(".patch") else name


def rel_path(name: str, label: str) -> str:
    """``patches/``-relative path of the variant of ``name`` labelled ``label`` (a release)."""
    return f"{DIR}/{stem(name)}/{label}.patch"


def load(root: Path, names: list) -> dict:
    """name -> [{"label", "rel", "text", "patch", "applies"}] for each variant on disk, by release order."""
    out = {}
    base = Path(root) / "patches" / DIR
    for name in names:
        folder = base / stem(name)
        found = []
        for p in sorted(folder.glob("*.patch")) if folder.is_dir() else []:
            text = fsutil.read_text(p, f"patches/{DIR}/{stem(name)}/{p.name}")
            patch = patchfile.parse(text, f"{DIR}/{stem(name)}/{p.name}")
            found.append({"label": p.stem, "rel": f"{DIR}/{stem(name)}/{p.name}", "text": text, "patch": patch,
                          "applies": patch.field("Applies-To")})
        if found:
            out[name] = sorted(found, key=lambda v: vkey(v["label"]))
    return out


def choose(variants: list, version: str) -> dict | None:
    """The variant serving ``version``: the one covering it (the one named after it where several do)."""
    hits = [v for v in variants if covers(v["applies"], version)]
    if len(hits) > 1:
        named = [v for v in hits if v["label"] == version]
        if len(named) != 1:
            raise ForkError(f"{len(hits)} variants serve {version}: {', '.join(v['rel'] for v in hits)}; "
                            "narrow their Applies-To")
        return named[0]
    return hits[0] if hits else None


def newest(found: list, main: str) -> dict | None:
    """The variant serving the newest release, where it serves one as new as the main text ``main`` or newer (by the
    last release of each Applies-To), else None. At a release older than a patch's ``Applies-From`` the patch is
    not applied, and its main text is, by this rule, its text for the newest release it serves: so a rebase
    there and back restores the series byte for byte whichever release's text was the main one in between."""
    mine = last_served(patchfile.parse(main, "main").field("Applies-To"))
    best = max(found, key=lambda v: last_served(v["applies"]), default=None)
    return best if best is not None and last_served(best["applies"]) >= mine else None  # a tie: the variant (the
    # main text was then written by a rebase to that release, from this variant)


def last_served(applies: str | None) -> tuple:
    """The newest release an ``Applies-To`` names, as a version key; () where it names none or is malformed."""
    try:
        return max((hi for _, hi in parse_applies(applies)), default=())
    except ForkError:
        return ()


def problems(root: Path, names: list) -> list:
    """What verify reports about patches/variants/: unknown patches, stray files, variants without a
    Description or whose Applies-To is malformed or leaves out the release they are named after. (Two
    variants serving one release are refused by ``choose`` when a rebase asks for it, unless one is named
    after it.)"""
    out = []
    base = Path(root) / "patches" / DIR
    if not base.is_dir():
        return out
    known = {stem(n) for n in names}
    for entry in sorted(base.iterdir()):
        if entry.name not in known:
            out.append(f"patches/{DIR}/{entry.name}: no patch of that name in patches/series")
        elif not entry.is_dir():
            out.append(f"patches/{DIR}/{entry.name}: expected a folder of <release>.patch files")
        else:
            stray = [p.name for p in entry.iterdir() if not p.name.endswith(".patch")]
            out += [f"patches/{DIR}/{entry.name}/{s}: not a .patch file" for s in sorted(stray)]
    try:
        loaded = load(root, [n for n in names if stem(n) in {e.name for e in base.iterdir()}])
    except (ForkError, patchfile.PatchError) as e:
        return out + [str(e)]
    for vs in loaded.values():
        for v in vs:
            try:
                if not parse_applies(v["applies"]):
                    out.append(f"patches/{v['rel']}: no Applies-To (which releases does it serve?)")
                elif not covers(v["applies"], v["label"]):
                    out.append(f"patches/{v['rel']}: its Applies-To ({v['applies']}) does not cover {v['label']}")
            except ForkError as e:
                out.append(f"patches/{v['rel']}: {e}")
            if not v["patch"].field("Description"):
                out.append(f"patches/{v['rel']}: no 'Description:' header (DEP-3)")
    return out


# ---------------------------------------------------------------- patches upstream has applied itself
SINCE = "Applied-Upstream"  # DEP-3: the first upstream release that has the patch's change
OLD_SINCE = "Upstream-Since"  # the name this series used before DEP-3's; still read in old files


def since(patch) -> str | None:
    """The release from which upstream has the patch's change (its DEP-3 ``Applied-Upstream`` field, or
    ``Upstream-Since`` in a file written before the series used DEP-3's name), or None."""
    return _release_field(patch, SINCE if patch.field(SINCE) is not None else OLD_SINCE)


def _release_field(patch, name: str) -> str | None:
    """Header field ``name`` as one release version ('0.7.0'; a leading v dropped), or None; ForkError where it
    is something else (a range, a word)."""
    value = patch.field(name)
    if value and (".." in value or not _ITEM.match(value)):
        raise ForkError(f"{name}: {value!r} is not a release version (e.g. 0.7.0)")
    return value.lstrip("v") if value else None


FROM = "Applies-From"  # the first upstream release that has the code the patch changes (older ones lack it)


def applies_from(patch) -> str | None:
    """The release from which the patch has something to change (its ``Applies-From`` field), or None: the
    code it fixes came in then (a scheduler added in 0.17, say), so the releases before need nothing."""
    return _release_field(patch, FROM)


def not_yet(patch, version: str) -> str | None:
    """``Applies-From`` where ``version`` is older than it (the code the patch changes is not there yet)."""
    f = applies_from(patch)
    return f if f and vkey(version) < vkey(f) else None


def skipped(patch, version: str) -> str | None:
    """Why the patch is not applied on ``version``, as a release: its ``Applied-Upstream`` where upstream has
    the change (version >= it), or its ``Applies-From`` where the code it changes is not there yet (version
    older than it); else None. Such a patch stays in patches/series for the releases it serves."""
    s = since(patch)
    if s and vkey(version) >= vkey(s):
        return s
    return not_yet(patch, version)


def active(patches: list, version: str) -> list:
    """The (name, patch) pairs of the series applied on ``version``: all but those upstream has by then."""
    return [(n, p) for n, p in patches if not skipped(p, version)]
