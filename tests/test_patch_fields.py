"""The DEP-3 header of every patch file, main texts and variants alike (patches/*.patch,
patches/variants/<patch>/<release>.patch): the fields the series uses are there and well formed.

- Description, Origin, Forwarded, Last-Update (an ISO date) and Applies-To (releases or ranges, read by
  forklib.variants; a variant's covers the release it is named after);
- no ``Upstream-Since:`` (the name the series used before DEP-3's ``Applied-Upstream``; the tool still
  reads it, but no file of the series may say it);
- ``Applied-Upstream``, where given, is one release version as the tool reads it (``variants.since``) and
  the same in a patch and each of its variants (a variant becomes the main text on a rebase);
- ``Bug:`` (or DEP-3's ``Bug-<Vendor>:``) is a URL.

``field_problems`` is checked on this checkout and, so that it can fail, on tampered copies in tmp_path.
"""
import datetime
import re
import shutil
from pathlib import Path

import pytest

from forklib import patchfile, tree, variants
from forklib.release import ForkError

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("Description", "Origin", "Forwarded", "Last-Update", "Applies-To")
OLD_FIELD = re.compile(r"^Upstream-Since:", re.IGNORECASE | re.MULTILINE)
BUG_FIELD = re.compile(r"^(Bug(?:-[\w-]+)?):[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
URL = re.compile(r"^https?://[\w.-]+\.[a-z]{2,}(?:/\S*)?$", re.IGNORECASE)


def patch_files(root: Path) -> list:
    """(rel path, main patch name, text, parsed patch) for each patch file, main texts first."""
    pdir = Path(root) / "patches"
    out = []
    for p in sorted(pdir.glob("*.patch")) + sorted((pdir / variants.DIR).glob("*/*.patch")):
        rel = p.relative_to(root).as_posix()
        main = p.name if p.parent == pdir else f"{p.parent.name}.patch"
        text = p.read_text(encoding="utf-8")
        out.append((rel, main, text, patchfile.parse(text, rel)))
    return out


def field_problems(root: Path) -> list:
    """What is wrong with the patch headers under ``root``/patches (empty: nothing)."""
    out = []
    files = patch_files(root)
    since = {}  # rel -> Applied-Upstream as the tool reads it (None: not given)
    for rel, _main, text, patch in files:
        header = patch.header
        for name in REQUIRED:
            if not patch.field(name):
                out.append(f"{rel}: no '{name}:' field")
        if OLD_FIELD.search(text):
            out.append(f"{rel}: says 'Upstream-Since:' (DEP-3's name is {variants.SINCE})")
        updated = patch.field("Last-Update")
        if updated:
            try:
                datetime.date.fromisoformat(updated)
            except ValueError:
                out.append(f"{rel}: Last-Update {updated!r} is not a date (YYYY-MM-DD)")
        applies = patch.field("Applies-To")
        if applies:
            try:
                variants.parse_applies(applies)
                label = Path(rel).stem
                if "/variants/" in rel and not variants.covers(applies, label):
                    out.append(f"{rel}: Applies-To {applies!r} does not cover {label}")
            except ForkError as e:
                out.append(f"{rel}: {e}")
        try:
            since[rel] = variants.since(patch)
        except ForkError as e:
            out.append(f"{rel}: {e}")
        for field_name, value in BUG_FIELD.findall(header):
            if not URL.match(value.strip()):
                out.append(f"{rel}: {field_name} {value.strip()!r} is not a URL")
    mains = {main: rel for rel, main, _, _ in files if "/variants/" not in rel}
    for rel, main, _, _ in files:
        if "/variants/" not in rel:
            continue
        if main not in mains:
            out.append(f"{rel}: no main patch patches/{main}")
        elif mains[main] in since and rel in since and since[rel] != since[mains[main]]:
            out.append(f"{rel}: {variants.SINCE} {since[rel] or '(none)'} but patches/{main} says "
                       f"{since[mains[main]] or '(none)'}")
    return out


def test_every_patch_file_has_well_formed_dep3_fields():
    files = patch_files(ROOT)
    series = tree.series(ROOT)
    mains = {main for rel, main, _, _ in files if "/variants/" not in rel}
    assert set(series) <= mains and len(files) > len(series)  # every patch of the series, and its variants
    assert field_problems(ROOT) == []


def test_applied_upstream_is_read_from_this_series():
    """The field the files say is the one the tool reads: 0008 is upstream's from 0.7.0, 0.4.2 applies it."""
    read = {main: variants.since(patch) for rel, main, _, patch in patch_files(ROOT) if "/variants/" not in rel}
    assert any(read.values())
    assert all(v is None or variants.vkey(v) > variants.vkey("0.4.2") for v in read.values())


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "fork"
    shutil.copytree(ROOT / "patches", dst / "patches")
    assert field_problems(dst) == []
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def header_line(path: Path, name: str) -> str:
    """The ``name:`` line of the patch file's header, with its newline."""
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(f"{name}:"):
            return line
    raise AssertionError(f"{path}: no {name}: line")


def with_applied_upstream(root: Path) -> tuple:
    """A main patch that has variants and says Applied-Upstream, and one of its variants."""
    for main in sorted((root / "patches").glob("*.patch")):
        folder = root / "patches" / variants.DIR / main.stem
        if folder.is_dir() and "\nApplied-Upstream:" in main.read_text(encoding="utf-8"):
            return main, sorted(folder.glob("*.patch"))[0]
    raise AssertionError("no patch with Applied-Upstream and variants")


@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_field_is_found(copy, field):
    main, variant = with_applied_upstream(copy)
    for path in (main, variant):
        edit(path, header_line(path, field), "")
    found = field_problems(copy)
    for path in (main, variant):
        assert f"{path.relative_to(copy).as_posix()}: no '{field}:' field" in found


def test_the_old_field_name_is_found(copy):
    """Upstream-Since is read by the tool as before, but no file may say it."""
    main, variant = with_applied_upstream(copy)
    edit(variant, "\nApplied-Upstream:", "\nUpstream-Since:")
    assert variants.since(patchfile.parse(variant.read_text())) == variants.since(patchfile.parse(main.read_text()))
    assert field_problems(copy) == [f"{variant.relative_to(copy).as_posix()}: says 'Upstream-Since:' "
                                    "(DEP-3's name is Applied-Upstream)"]


@pytest.mark.parametrize("value", ["soon", "0.7.0..0.8.0", "0.7.0, https://github.com/huggingface/diffusers"])
def test_applied_upstream_must_be_a_release(copy, value):
    main, _ = with_applied_upstream(copy)
    edit(main, header_line(main, "Applied-Upstream"), f"Applied-Upstream: {value}\n")
    found = field_problems(copy)
    assert f"{main.relative_to(copy).as_posix()}: Applied-Upstream: {value!r} is not a release version (e.g. 0.7.0)" \
        in found


@pytest.mark.parametrize("change", ["other release", "left out"])
def test_applied_upstream_must_agree_with_the_variants(copy, change):
    main, variant = with_applied_upstream(copy)
    line = header_line(variant, "Applied-Upstream")
    edit(variant, line, "Applied-Upstream: 9.9.9\n" if change == "other release" else "")
    said = variants.since(patchfile.parse(main.read_text()))
    assert field_problems(copy) == [f"{variant.relative_to(copy).as_posix()}: Applied-Upstream "
                                    f"{'9.9.9' if change == 'other release' else '(none)'} but "
                                    f"patches/{main.name} says {said}"]
    # the tool's own check (verify) says the same
    assert any("a patch and its variants must agree" in p
               for p in tree.since_problems(copy, main.name, patchfile.parse(main.read_text())))


@pytest.mark.parametrize("value", ["#779", "huggingface/diffusers#779", "github.com/huggingface/diffusers/issues/779",
                                   ""])
def test_bug_must_be_a_url(copy, value):
    main, _ = with_applied_upstream(copy)
    edit(main, "\nApplies-To:", f"\nBug: {value}\nApplies-To:")
    assert field_problems(copy) == [f"{main.relative_to(copy).as_posix()}: Bug {value!r} is not a URL"]
    edit(main, f"\nBug: {value}\n", "\nBug-Debian: https://bugs.debian.org/1\n")
    assert field_problems(copy) == []


def test_dates_and_applies_to_are_read_as_the_tool_reads_them(copy):
    main, variant = with_applied_upstream(copy)
    edit(main, header_line(main, "Last-Update"), "Last-Update: 2026-13-01\n")
    edit(variant, header_line(variant, "Applies-To"), "Applies-To: 0.0.1\n")
    found = field_problems(copy)
    assert f"{main.relative_to(copy).as_posix()}: Last-Update '2026-13-01' is not a date (YYYY-MM-DD)" in found
    assert f"{variant.relative_to(copy).as_posix()}: Applies-To '0.0.1' does not cover {variant.stem}" in found
    edit(variant, "Applies-To: 0.0.1\n", "Applies-To: later\n")
    assert any(p.startswith(f"{variant.relative_to(copy).as_posix()}: Applies-To item 'later'")
               for p in field_problems(copy))
