"""examples/generate.py with an SDXL, SD3 or Flux folder (releases that have them: after ``fork.py rebase``).

Each model is the tiny configuration of ``diffusers.flash.local_sdxl_sd3_flux``, saved with
``save_pretrained``; generate.py loads it by its ``model_index.json`` and must give the size asked for, the
same bytes on a rerun with the seed, and resume without redoing images.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffusers

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _generate(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    # the diffusers this test imported (the checkout's src/, or a fork installed at another release)
    where = str(Path(diffusers.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=where)
    return subprocess.run([sys.executable, str(ROOT / "examples/generate.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def model_folder(request, tmp_path_factory):
    model = request.param
    if not hasattr(diffusers, PIPELINES[model]):
        pytest.skip(f"diffusers {diffusers.__version__} has no {PIPELINES[model]}")
    from diffusers.flash import local_sdxl_sd3_flux

    folder = tmp_path_factory.mktemp(model) / "model"
    local_sdxl_sd3_flux.pipeline(model, "tiny").save_pretrained(folder)
    return model, folder


def _pngs(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.png"))}


def test_generate_takes_the_models_folder_and_gives_its_size(model_folder, tmp_path):
    model, folder = model_folder
    from PIL import Image

    side = 32  # the tiny models' own size (their VAE does not scale: 1 pixel a latent)
    args = ("a red fox", "--model", str(folder), "--steps", "2", "--num-images-per-prompt", "2",
            "--height", str(side), "--width", str(side), "--out", "out")
    first = _generate(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    pngs = _pngs(tmp_path / "out")
    assert len(pngs) == 2, first.stderr[-2000:]
    for png in (tmp_path / "out").rglob("*.png"):
        assert Image.open(png).size == (side, side)
    rows = [json.loads(line) for line in next((tmp_path / "out").rglob("manifest.jsonl")).read_text().splitlines()]
    assert len(rows) == 2
    # the same command again: nothing to redo, the same bytes
    again = _generate(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _pngs(tmp_path / "out") == pngs
    # removed images are made again, byte for byte (each image's seed fixes its latents)
    for png in (tmp_path / "out").rglob("*.png"):
        png.unlink()
    third = _generate(*args, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert _pngs(tmp_path / "out") == pngs


def test_flux_sizes_must_fit_its_patches(tmp_path):
    """Checked before any model loads: a folder that says FluxPipeline, with an 8x VAE (Flux's own), asked for
    a height of 129 latents."""
    folder = tmp_path / "flux"
    (folder / "vae").mkdir(parents=True)
    (folder / "transformer").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"in_channels": 64}))
    done = _generate("a red fox", "--model", str(folder), "--height", "1032", "--width", "1024", "--out", "out",
                     cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "2x2 patches" in lines[0] and "multiples of 16" in lines[0], done.stderr
