#!/usr/bin/env python3
"""diffusers-flash: the fork as a patch series over a pinned upstream Diffusers release.

  materialize    lay pristine upstream + patches/series into src/diffusers/
  refresh        turn edits in the laid-down files back into the patch files
  verify         check the tree is exactly pristine + series, and the series is clean
  rebase         move the series onto another upstream release
  test-upstream  run upstream's own test suite against the installed fork
  release        the fork at other upstream releases, one pip command each (releases/)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forklib import build, fsutil, rebase, tree, upstream_tests
from forklib.patchfile import PatchError
from forklib.release import ForkError

AFTER_CTRL_C = {  # what a command stopped by Ctrl-C leaves (rebase says it itself)
    "materialize": "; each file is written whole, then renamed into place: run it again to finish",
    "refresh": "; each file is written whole, then renamed into place: run it again to finish",
    "verify": "; verify changes nothing",
    "test-upstream": "; what pip installed so far stays installed",
}

ROOT = Path(__file__).resolve().parent.parent


WRITES = ("materialize", "refresh", "rebase")  # commands that hold the project's lock (rebase --check does not)


def cmd_materialize(args):
    tree.materialize(ROOT, force=args.force)
    return 0


def cmd_refresh(args):
    tree.refresh(ROOT, new_patch=args.patch)
    return 0


def cmd_verify(args):
    problems = tree.verify(ROOT)
    if problems:
        print(f"verify: FAILED against {tree.status_line(ROOT)}")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"verify: OK: src/diffusers is exactly {tree.status_line(ROOT)}; every patch applies with zero fuzz")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fork.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("materialize", help="lay pristine upstream + series into src/diffusers/",
                       description="Fetch the pinned upstream release (pip; sha256 checked), apply patches/series and "
                                   "lay the files into src/diffusers/ beside our own modules. Idempotent. Refuses to "
                                   "overwrite hand edits to laid-down files unless --force.")
    p.add_argument("--force", action="store_true", help="overwrite hand edits to laid-down files")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("refresh", help="turn edits in the laid-down tree back into patch files",
                       description="Without --patch, each edited upstream file goes back into the last patch of "
                                   "the series that touches it (files no patch touches need --patch). With --patch, "
                                   "every edit goes into that patch, also beneath later patches that touch the same "
                                   "file, as long as they still apply on top. Zero fuzz, stable output: running it "
                                   "twice changes nothing.")
    p.add_argument("--patch", metavar="NNNN-topic.patch",
                   help="the patch to hold the edits (created and appended to the series if new)")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("verify", help="check the tree equals pristine + series, byte for byte",
                       description="Checks: the release file matches the pin's sha256; every patch in patches/ is in "
                                   "the series and vice versa; each has a DEP-3 Description and applies with zero fuzz "
                                   "and no offset; src/diffusers/ equals pristine + series byte for byte; no file of "
                                   "ours shadows an upstream file; every file under src/diffusers/ is laid down, "
                                   "generated or ours (tracked by git), and none is a symlink; PATCHES.md describes "
                                   "each patch. Exit 1 otherwise.")
    p.set_defaults(func=cmd_verify)

    rebase.add_parser(sub, ROOT)
    upstream_tests.add_parser(sub, ROOT)
    build.add_parser(sub, ROOT)

    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if args.cmd in WRITES and not getattr(args, "check", False):
            with fsutil.locked(Path(getattr(args, "root", ROOT)), "fork.py " + " ".join(argv)):
                return args.func(args)
        return args.func(args)
    except fsutil.Interrupted as e:
        print(f"fork.py {args.cmd}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"fork.py {args.cmd}: interrupted (Ctrl-C){AFTER_CTRL_C.get(args.cmd, '')}", file=sys.stderr)
        return 130
    except (ForkError, PatchError) as e:
        print(f"fork.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: say which, without a traceback
        print(f"fork.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
