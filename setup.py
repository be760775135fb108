"""Build diffusers-flash: pristine upstream Diffusers (the pinned release, fetched with pip and
checked against its sha256) + patches/series + our own modules, packaged as ``diffusers``.

``pip install git+<repo>``, ``pip install .`` and ``pip install -e .`` all run this file, which
calls ``scripts/fork.py materialize`` first (idempotent; refuses to clobber hand edits).
The fork at another upstream release is built by ``releases/<X>/setup.py`` (scripts/forklib/build.py).
"""
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))

from forklib import release, tree  # noqa: E402

PIN = release.load_pin(ROOT)
try:
    tree.materialize(ROOT, log=lambda msg: print(f"diffusers-flash: {msg}", file=sys.stderr))
except (release.ForkError, OSError) as e:  # OSError: a read-only checkout, a full disk
    sys.exit(f"diffusers-flash: cannot lay down upstream diffusers {PIN['version']}: {e}")

# upstream's files that are not modules (0.4.2: utils/model_card_template.md) go into the wheel too
laid = [Path(rel) for rel in tree.manifest(ROOT)["files"] if not rel.endswith(".py")]
package_data = {}
for rel in laid:
    package_data.setdefault(".".join(rel.parent.parts[1:]), []).append(rel.name)

extras = {
    "torch": ["torch>=2.1", "accelerate>=0.20"],
    "transformers": ["transformers>=4.30"],
    "flash": ["flash-attn>=2.0"],
    "flash4": ["flash-attn-4>=4.0.0b36"],  # pre-releases only so far: the specifier admits them
    "test": ["pytest", "scipy", "transformers>=4.30", "accelerate>=0.20", "torch>=2.1"],
}
extras["dev"] = sorted(set(extras["test"]))

setup(
    name="diffusers",
    version=release.fork_version(PIN),
    description="Diffusers 0.4.x with FlashAttention: exact, faster, leaner (diffusers-flash fork)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache 2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=False,
    package_data=package_data,
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "Pillow",
        "regex!=2019.12.17",
        "requests",
        "filelock",
        "importlib_metadata",
        "packaging",
        "tqdm",
        "huggingface-hub>=0.20",
        "safetensors>=0.3",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["diffusers-cli=diffusers.commands.diffusers_cli:main"]},
)
