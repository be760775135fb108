"""examples/generate.py on the CPU with the tiny local pipeline: same bytes on 1 or 2 processes, a killed
run resumes without redoing finished images, the README's no-argument job, clear errors on bad input."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "generate.py"
PROMPTS = [{"prompt": "a red cube"}, {"prompt": "a dog", "seed": 7, "negative_prompt": "blurry"}]
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--num-images-per-prompt", "2", "--device", "cpu"]
FILES = [f"{p:05d}-{i:04d}.png" for p in range(2) for i in range(2)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(cwd, *args, procs=1, expect_rc=0):
    cmd = [sys.executable, str(SCRIPT)]
    if procs > 1:  # accelerate starts several local processes only through torchrun (--multi_gpu), GPU or not
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                    "--main_process_port", str(free_port())]
        cmd.remove(str(SCRIPT))
        cmd.append(str(SCRIPT))
    r = subprocess.run(cmd + list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == expect_rc, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def read(out):
    return {f: (out / f).read_bytes() for f in FILES}


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(prompts_file):
    """One process, batch size 3: batches (0,0),(0,1),(1,0) and (1,1)."""
    out = prompts_file.parent / "ref"
    r = generate(out.parent, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL)
    assert f"in {out}/" in r.stdout
    return out


def test_reference_run_writes_pngs_and_manifest(reference):
    assert sorted(p.name for p in reference.glob("*.png")) == FILES
    rows = manifest(reference)
    assert [r["file"] for r in rows] == FILES
    assert [(r["prompt"], r["negative_prompt"]) for r in rows] == [("a red cube", "")] * 2 + [("a dog", "blurry")] * 2
    assert [r["seed"] for r in rows[2:]] == [7, 8]  # a prompt's own seed S gives its images S, S+1
    assert len({r["seed"] for r in rows}) == 4
    assert all(r["backend"] == "auto" and r["seconds"] > 0 and r["batch_size"] in (1, 3) for r in rows)
    assert {Image.open(reference / f).size for f in FILES} == {(16, 16)}  # latents 8x8; the tiny VAE doubles
    assert not list(reference.glob("manifest.part-*")) and not list(reference.glob(".*.tmp"))


def test_two_processes_write_the_same_bytes(reference, prompts_file, tmp_path):
    out = tmp_path / "two"
    r = generate(tmp_path, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL, procs=2)
    assert read(out) == read(reference)
    rows = manifest(out)
    assert [r["rank"] for r in rows] == [0, 0, 0, 1]  # the work was split: batch 1 to process 0, 2 to 1
    assert "images (process 0 of 2)" in r.stderr
    assert [r["seed"] for r in rows] == [r["seed"] for r in manifest(reference)]


def test_batch_size_changes_images_only_by_float_rounding(reference, prompts_file, tmp_path):
    """Each image's noise is its own; only batched kernels' rounding may differ (a pixel value by 1)."""
    out = tmp_path / "b1"
    generate(tmp_path, "--prompts", str(prompts_file), "--batch-size", "1", "--out", str(out), *SMALL)
    for f in FILES:
        a = np.asarray(Image.open(out / f), dtype=np.int16)
        b = np.asarray(Image.open(reference / f), dtype=np.int16)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, f
    assert [r["seed"] for r in manifest(out)] == [r["seed"] for r in manifest(reference)]


def test_killed_run_resumes_without_redoing_images(reference, prompts_file, tmp_path):
    out = tmp_path / "killed"
    args = ["--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL]
    # dies abruptly (os._exit) after one image, leaving the second half-written under a temporary name
    generate(tmp_path, *args, "--_stop-after", "1", expect_rc=3)
    assert sorted(p.name for p in out.glob("*.png")) == FILES[:1]
    assert len(list(out.glob(".*.tmp"))) == 1 and not (out / "manifest.jsonl").exists()
    first = (out / FILES[0]).stat()
    restart = time.time()
    r = generate(tmp_path, *args)
    assert "(1 already there)" in r.stdout
    assert (out / FILES[0]).stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    assert read(out) == read(reference)  # the partly done batch was recomputed in the same composition
    assert not list(out.glob(".*.tmp")) and not list(out.glob("manifest.part-*"))
    rows = manifest(out)
    assert [r["file"] for r in rows] == FILES
    assert rows[0]["finished"] < restart < min(r["finished"] for r in rows[1:])


def test_model_folder_matches_the_builtin_tiny_pipeline(reference, prompts_file, tmp_path):
    from diffusers import local_pipelines

    local_pipelines.stable_diffusion("tiny").save_pretrained(tmp_path / "tiny-sd")
    out = tmp_path / "folder"
    generate(tmp_path, "--model", str(tmp_path / "tiny-sd"), "--prompts", str(prompts_file), "--batch-size", "3",
             "--out", str(out), *SMALL)
    assert read(out) == read(reference)
    assert {r["model"] for r in manifest(out)} == {str(tmp_path / "tiny-sd")}


def test_readme_job_runs_with_no_arguments(tmp_path):
    start = time.time()
    r = generate(tmp_path)
    png = tmp_path / "out" / "00000-0000.png"
    assert Image.open(png).size == (64, 64) and "in out/" in r.stdout
    (row,) = manifest(tmp_path / "out")
    assert row["steps"] == 10 and row["prompt"] == "a photograph of an astronaut riding a horse"
    print(f"no-argument run: {time.time() - start:.1f}s")


# ------------------------------------------------------------------------------ errors (in process)

def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_of(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        load_script().main(argv)
    return str(e.value.code) if capsys is None else capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [
    ("", "has no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "cut\n', "line 2: not valid JSON"),
    ('{"prompt": "ok"}\n{"promt": "typo"}\n', "line 2: unknown key(s) ['promt']"),
    ('{"seed": 3}\n', 'line 1: needs a non-empty string "prompt"'),
    ('{"prompt": "a", "seed": "3"}\n', 'line 1: "seed" must be an integer from 0'),
    ('{"prompt": "a", "seed": -1}\n', 'line 1: "seed" must be an integer from 0'),
    ('["a"]\n', "line 1: expected a JSON object"),
])
def test_bad_prompts_file_is_refused_clearly(tmp_path, text, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    message = error_of(["--prompts", str(path), "--out", str(tmp_path / "out")])
    assert message.startswith("generate.py: error: ") and expected in message and str(path) in message
    assert not (tmp_path / "out").exists()


def test_missing_prompts_file_and_bad_arguments(tmp_path, capsys):
    assert "cannot read prompts file" in error_of(["--prompts", str(tmp_path / "nope.txt")])
    assert "multiple of 8" in error_of(["--height", "60"], capsys)
    assert "not both" in error_of(["a cat", "--prompts", "x.txt"], capsys)


def test_plain_text_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    args = load_script().parse_args(["--prompts", str(path), "--negative-prompt", "fog"])
    assert load_script().load_prompts(args) == [{"prompt": "a cat", "negative_prompt": "fog"},
                                               {"prompt": "a dog", "negative_prompt": "fog"}]


def test_unknown_attention_backend_is_refused(tmp_path):
    message = error_of(["--attention-backend", "no-such-backend", "--out", str(tmp_path / "out")])
    assert "--attention-backend no-such-backend" in message


def test_rerun_with_other_settings_is_refused(reference, prompts_file):
    before = read(reference)
    message = error_of(["--prompts", str(prompts_file), "--batch-size", "3", "--out", str(reference),
                        *SMALL[:4], "--steps", "3", *SMALL[6:]])
    assert "other settings (steps: 2 -> 3)" in message
    assert read(reference) == before
