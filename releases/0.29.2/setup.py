# diffusers-flash at upstream diffusers 0.29.2: `pip install ./releases/0.29.2` (written by
# `scripts/fork.py release add`; the build is scripts/forklib/build.py, which finds the repository above).
import sys
from pathlib import Path

ROOT = next((p for p in Path(__file__).resolve().parents if (p / "scripts" / "forklib" / "build.py").is_file()), None)
if ROOT is None:
    sys.exit("diffusers-flash: build this from a clone of the repository (pip install ./releases/0.29.2)")
sys.path.insert(0, str(ROOT / "scripts"))

from forklib.build import setup_release  # noqa: E402

setup_release(__file__)
