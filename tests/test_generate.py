"""examples/generate.py on the CPU with the tiny local pipeline: same bytes on 1 or 2 processes, a killed or
interrupted run resumes without redoing finished images (and redoes PNGs that do not decode), a second
prompt goes to its own folder, the README's no-argument job, one-line errors on bad input.

Most runs are in this process (generate.main(argv)); only what needs a real process runs as one: two
processes under accelerate, a kill (os._exit), Ctrl-C."""
import importlib.util
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "generate.py"
PROMPTS = [{"prompt": "a red cube"}, {"prompt": "a dog", "seed": 7, "negative_prompt": "blurry"}]
# 64x64 pixels: the tiny model's latents are 8x8 (1/8 of a side, as Stable Diffusion's); smaller latents make
# its group norms average over a few values, where batching's float rounding is amplified
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--num-images-per-prompt", "2", "--device", "cpu"]
FILES = [f"{p:05d}-{i:04d}.png" for p in range(2) for i in range(2)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(*args, procs=1):
    cmd = [sys.executable, str(SCRIPT)]
    if procs > 1:  # accelerate starts several local processes only through torchrun (--multi_gpu), GPU or not
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--main_process_port", str(free_port()), str(SCRIPT)]
    return cmd + list(args)


def generate_process(cwd, *args, procs=1, expect_rc=0):
    r = subprocess.run(command(*args, procs=procs), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == expect_rc, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load_script()


def generate(gen, *args):
    """A run in this process; returns the run's folder (the only one under --out that it names)."""
    gen.main(list(args))
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path("out")
    name = args[args.index("--name") + 1] if "--name" in args else None
    return out / name if name else run_folder(out)


def run_folder(out):
    (folder,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return folder


def error_of(gen, argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    return str(e.value.code) if capsys is None else capsys.readouterr().err


def read(folder):
    return {f: (folder / f).read_bytes() for f in FILES}


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(gen, prompts_file):
    """One process, batch size 3: batches (0,0),(0,1),(1,0) and (1,1)."""
    return generate(gen, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(prompts_file.parent / "ref"),
                    *SMALL)


def test_reference_run_writes_pngs_and_manifest(reference):
    assert reference.name.startswith("prompts-")  # named after the prompts file, then the settings' hash
    assert sorted(p.name for p in reference.glob("*.png")) == FILES
    rows = manifest(reference)
    assert [r["file"] for r in rows] == FILES
    assert [(r["prompt"], r["negative_prompt"]) for r in rows] == [("a red cube", "")] * 2 + [("a dog", "blurry")] * 2
    assert [r["seed"] for r in rows[2:]] == [7, 8]  # a prompt's own seed S gives its images S, S+1
    assert len({r["seed"] for r in rows}) == 4
    assert all(r["backend"] == "auto" and r["seconds"] > 0 and r["batch_size"] in (1, 3) for r in rows)
    assert {Image.open(reference / f).size for f in FILES} == {(64, 64)}  # --height/--width are the PNG's size
    assert {(r["width"], r["height"]) for r in rows} == {(64, 64)}
    assert not list(reference.glob("manifest.part-*")) and not list(reference.glob(".*.tmp"))
    assert json.loads((reference / "run.json").read_text())["steps"] == 2


@pytest.mark.slow  # a real subprocess: seconds
def test_two_processes_write_the_same_bytes(reference, prompts_file, tmp_path):
    out = tmp_path / "two"
    r = generate_process(tmp_path, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL,
                         procs=2)
    folder = run_folder(out)
    assert folder.name == reference.name  # the same settings, the same folder name
    assert read(folder) == read(reference)
    rows = manifest(folder)
    assert [r["rank"] for r in rows] == [0, 0, 0, 1]  # the work was split: batch 1 to process 0, 2 to 1
    assert "images (process 0 of 2)" in r.stderr
    assert [r["seed"] for r in rows] == [r["seed"] for r in manifest(reference)]


def test_a_folder_made_by_another_process_meanwhile_is_taken_as_it_is(gen, tmp_path, monkeypatch):
    """Every process of a run checks --out; when two make the same missing folder at once, the slower one's
    mkdir meets FileExistsError. That is not an error, and the folder is not this process's to remove."""
    root = tmp_path / "a" / "b"
    real_mkdir = Path.mkdir

    def raced_mkdir(self, *a, **k):
        real_mkdir(self)  # the other process got there first
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", raced_mkdir)
    output = gen.Output(root, root / "run")
    output.check_writable("--out")
    monkeypatch.undo()
    assert root.is_dir() and output.created == []
    file = tmp_path / "f"
    file.write_text("x")
    monkeypatch.setattr(Path, "exists", lambda self: False if self == file else os.path.lexists(self))
    with pytest.raises(gen.UsageError, match="cannot write into"):  # a file in the way is still refused
        gen.Output(file, file / "run").check_writable("--out")


def test_batch_size_changes_images_only_by_float_rounding(gen, reference, prompts_file, tmp_path):
    """Each image's noise is its own; only batched kernels' rounding may differ (a pixel value by 1)."""
    folder = generate(gen, "--prompts", str(prompts_file), "--batch-size", "1", "--out", str(tmp_path), *SMALL)
    for f in FILES:
        a = np.asarray(Image.open(folder / f), dtype=np.int16)
        b = np.asarray(Image.open(reference / f), dtype=np.int16)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05, f
    assert [r["seed"] for r in manifest(folder)] == [r["seed"] for r in manifest(reference)]


@pytest.mark.slow  # a real subprocess: seconds
def test_killed_run_resumes_without_redoing_images(gen, reference, prompts_file, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL]
    # dies abruptly (os._exit) after one image, leaving the second half-written under a temporary name
    generate_process(tmp_path, *args, "--_stop-after", "1", expect_rc=3)
    folder = run_folder(out)
    assert sorted(p.name for p in folder.glob("*.png")) == FILES[:1]
    assert len(list(folder.glob(".*.tmp"))) == 1 and not (folder / "manifest.jsonl").exists()
    first = (folder / FILES[0]).stat()
    restart = time.time()
    assert generate(gen, *args) == folder
    assert "(1 already there)" in capsys.readouterr().out
    assert (folder / FILES[0]).stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    assert read(folder) == read(reference)  # the partly done batch was recomputed in the same composition
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob("manifest.part-*"))
    rows = manifest(folder)
    assert [r["file"] for r in rows] == FILES
    assert rows[0]["finished"] < restart < min(r["finished"] for r in rows[1:])


def test_png_that_does_not_decode_is_made_again(gen, reference, prompts_file, tmp_path, capsys):
    """Issue 19 item 10: an empty or cut-short PNG is not taken as done."""
    out = tmp_path / "broken"
    shutil.copytree(reference, out / reference.name)
    folder = out / reference.name
    (folder / FILES[1]).write_bytes(b"")
    data = (folder / FILES[3]).read_bytes()
    (folder / FILES[3]).write_bytes(data[: len(data) // 2])
    kept = (folder / FILES[0]).stat().st_mtime_ns
    generate(gen, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(out), *SMALL)
    captured = capsys.readouterr()
    assert f"{FILES[1]} does not decode" in captured.err and f"{FILES[3]} does not decode" in captured.err
    assert "(2 already there)" in captured.out
    assert read(folder) == read(reference)
    assert (folder / FILES[0]).stat().st_mtime_ns == kept
    assert [r["file"] for r in manifest(folder)] == FILES


def test_png_is_fsynced_before_its_rename(gen, prompts_file, tmp_path, monkeypatch):
    """Issue 19 item 10: the PNG's bytes reach the disk before the name that says the image is done."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name an fd's file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    generate(gen, "--prompts", str(prompts_file), "--batch-size", "3", "--out", str(tmp_path), *SMALL)
    renames = [(k, e[1]) for k, e in enumerate(events) if e[0] == "replace" and e[2].endswith(".png")]
    assert [events[k][2] for k, _ in renames] == FILES
    for k, tmp in renames:
        assert ("fsync", tmp) in events[:k], tmp


@pytest.mark.slow  # whole pipelines on the CPU: seconds each
def test_model_folder_matches_the_builtin_tiny_pipeline(gen, reference, prompts_file, tmp_path, capsys):
    from diffusers.flash import local_pipelines

    local_pipelines.stable_diffusion("tiny").save_pretrained(tmp_path / "tiny-sd")
    folder = generate(gen, "--model", str(tmp_path / "tiny-sd"), "--prompts", str(prompts_file), "--batch-size", "3",
                      "--out", str(tmp_path / "out"), *SMALL)
    assert read(folder) == read(reference)
    assert {r["model"] for r in manifest(folder)} == {str((tmp_path / "tiny-sd").resolve())}
    err = capsys.readouterr().err
    assert "steps:" in err and "step/s]" in err  # a model given: a bar of denoising steps per batch


def test_readme_job_runs_with_no_arguments(gen, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    gen.main([])
    folder = run_folder(tmp_path / "out")
    assert f"in out/{folder.name}/" in capsys.readouterr().out
    png = folder / "00000-0000.png"
    assert Image.open(png).size == (64, 64)
    (row,) = manifest(folder)
    assert row["steps"] == 10 and row["prompt"] == "a photograph of an astronaut riding a horse"
    assert (row["width"], row["height"]) == (64, 64)  # the manifest records the PNG as written (issue 20 item 4)
    print(f"no-argument run: {time.time() - start:.1f}s")


# ------------------------------------------------------------------- issue 20 item 1: running again

def test_a_second_prompt_goes_to_a_new_folder_and_the_same_command_resumes(gen, tmp_path, capsys):
    small = ["--out", str(tmp_path), *SMALL]
    first = generate(gen, *small)
    before = read_all(first)
    capsys.readouterr()
    gen.main(["a castle at dawn", *small])
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2 and first in folders
    (second,) = [p for p in folders if p != first]
    assert second.name.startswith("a-castle-at-dawn-") and f"in {second}/" in capsys.readouterr().out
    assert read_all(first) == before  # the old images stay
    gen.main(small)  # the first command again: resumes, nothing to make
    captured = capsys.readouterr()
    assert f"2 images (2 already there) as PNGs in {first}/" in captured.out and "resuming" in captured.err
    assert read_all(first) == before


def read_all(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


def test_named_run_with_other_settings_is_refused_in_words(gen, tmp_path):
    small = ["--out", str(tmp_path), "--name", "mine", "--height", "16", "--width", "16", "--device", "cpu"]
    folder = generate(gen, "a red cube", *small, "--steps", "2")
    before = read_all(folder)
    message = error_of(gen, ["a blue cube", *small, "--steps", "3"])
    assert message.startswith("generate.py: error: ") and "\n" not in message
    assert "the prompt changed ('a red cube' -> 'a blue cube')" in message
    assert "--steps changed (2 -> 3)" in message and "sha256" not in message
    assert read_all(folder) == before


def test_failed_run_leaves_nothing_behind(gen, tmp_path, capsys):
    out = tmp_path / "out"
    message = error_of(gen, ["--model", str(tmp_path / "nonexistent"), "--out", str(out), *SMALL])
    assert "does not exist" in message
    assert not out.exists()
    broken = tmp_path / "broken-model"  # fails while loading, after --out was made
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    message = error_of(gen, ["--model", str(broken), "--out", str(out), *SMALL])
    assert message.startswith("generate.py: error: cannot load --model") and "\n" not in message
    assert not out.exists()
    generate(gen, "--out", str(out), *SMALL)  # the corrected run is not blocked
    assert len(list(run_folder(out).glob("*.png"))) == 2


# ------------------------------------------------------------------- issue 20 item 2: one-line errors

def one_line(message):
    assert message.startswith("generate.py: error: ") and "\n" not in message.strip(), message
    assert "Traceback" not in message
    return message


def test_out_naming_a_file_or_an_unwritable_folder(gen, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "that is a file, not a folder" in one_line(error_of(gen, ["--out", str(afile), *SMALL]))
    assert f"{afile} is a file" in one_line(error_of(gen, ["--out", str(afile / "sub"), *SMALL]))
    if os.geteuid() == 0 and os.path.isdir("/sys/kernel"):
        locked = Path("/sys/kernel/diffusers-flash-test")  # root may write anywhere but here
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    message = one_line(error_of(gen, ["--out", str(locked / "out"), *SMALL]))
    assert "cannot write into" in message and str(locked) in message
    assert not (locked / "out").exists()


def test_cuda_device_without_a_gpu(gen):
    if torch.cuda.is_available():
        message = one_line(error_of(gen, ["--device", "cuda:99"]))
        assert "GPU(s), numbered from 0" in message
    else:
        message = one_line(error_of(gen, ["--device", "cuda"]))
        assert "--device cuda: no CUDA GPU here" in message
    assert "not a device name" in one_line(error_of(gen, ["--device", "gpu0"]))


@pytest.mark.parametrize("model", ["/nonexistent/sd-v1-4", "./sd-v1-4", "~/no-such-dir/sd", "a/b/c"])
def test_model_path_that_does_not_exist(gen, model):
    message = one_line(error_of(gen, ["--model", model]))
    assert f"--model {model}: the path " in message and "does not exist" in message
    assert "Hub" not in message and "huggingface.co" not in message


def test_model_path_heuristics(gen, tmp_path, monkeypatch):
    assert not gen.looks_like_path("CompVis/stable-diffusion-v1-4") and not gen.looks_like_path("gpt2")
    for path in ("/abs", "./rel", "../up", "~/x", "a/b/c", "with space/x", "C:\\models\\sd"):
        assert gen.looks_like_path(path), path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert gen.looks_like_path("models/sd-v1-4")  # its parent folder is here: a local path, mistyped


def test_hub_repo_id_offline_and_not_cached(gen, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    monkeypatch.setattr("huggingface_hub.file_download.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    start = time.time()
    message = one_line(error_of(gen, ["--model", "someone/some-model", "--out", str(tmp_path / "out")]))
    assert "taken as a Hub repo id" in message and "not in the Hugging Face cache" in message
    assert "offline (HF_HUB_OFFLINE is set)" in message and "hf download someone/some-model" in message
    assert time.time() - start < 10 and not (tmp_path / "out").exists()


@pytest.mark.slow  # a real subprocess: seconds
def test_ctrl_c_says_a_rerun_resumes_and_exits_130(gen, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["a red cube", "--out", str(out), *SMALL[:-4], "--num-images-per-prompt", "30", "--device", "cpu"]
    # Ctrl-C as a terminal sends it: SIGINT at its default, also where this test runs in a background job
    # (a shell starts those with SIGINT ignored, which Python then never turns into KeyboardInterrupt)
    proc = subprocess.Popen(command(*args), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list(out.glob("*/00000-0001.png")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("generate.py: interrupted (Ctrl-C); ") and "run the same command again to resume" in last
    folder = run_folder(out)
    saved = len(list(folder.glob("*.png")))
    assert 2 <= saved < 30 and f"{saved} of 30 images are in {folder}/" in last
    assert len(manifest(folder)) == saved  # the manifest was brought up to date
    generate(gen, *args)
    assert f"({saved} already there)" in capsys.readouterr().out
    assert len(list(folder.glob("*.png"))) == 30 and len(manifest(folder)) == 30


# ------------------------------------------------------------------------- issue 20 item 3: arguments

def test_an_option_given_twice_or_with_two_values_is_refused(gen):
    err = one_line(error_of(gen, ["--seed", "1", "--seed", "2"]))
    assert "--seed given twice (1, then 2): give it once" in err
    err = one_line(error_of(gen, ["--seed", "1", "2"]))
    assert "'2' would be taken as the prompt (it follows '--seed 1')" in err and "--prompt 2" in err
    err = one_line(error_of(gen, ["a castle", "--seed", "1", "2"]))
    assert "unrecognized argument '2' (it follows '--seed 1'): each option takes one value" in err
    assert "unrecognized option '--bogus'; --help lists them" in one_line(error_of(gen, ["--bogus", "x"]))
    err = one_line(error_of(gen, ["--steps=3", "4"]))
    assert "(it follows '--steps=3')" in err
    assert "given twice" in one_line(error_of(gen, ["--out", "a", "--out", "b"]))


def test_backend_from_the_environment_is_named_as_such(gen, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ATTENTION_BACKEND", "bogus")
    message = one_line(error_of(gen, ["--device", "cpu"]))
    assert "$DIFFUSERS_ATTENTION_BACKEND=bogus: unknown attention backend" in message
    assert "--attention-backend" not in message
    message = one_line(error_of(gen, ["--attention-backend", "no-such-backend"]))
    assert "--attention-backend no-such-backend: unknown" in message


def test_explicit_backend_beats_the_environment(gen, tmp_path, monkeypatch):
    from diffusers.flash.attention import dispatch as ad

    seen = []
    real = ad.backend_for

    def backend_for(module=None, **kwargs):
        seen.append(real(module, **kwargs))
        return seen[-1]

    monkeypatch.setattr(ad, "backend_for", backend_for)
    monkeypatch.setenv("DIFFUSERS_ATTENTION_BACKEND", "math")
    folder = generate(gen, "--attention-backend", "auto", "--out", str(tmp_path), *SMALL)
    assert seen and set(seen) == {"auto"}  # not the environment's math
    assert {r["backend"] for r in manifest(folder)} == {"auto"}
    seen.clear()
    folder = generate(gen, "--out", str(tmp_path / "env"), *SMALL)
    assert seen and set(seen) == {"math"}
    assert json.loads((folder / "run.json").read_text())["attention_backend"] == "math"


# ------------------------------------------------------------------------------- issue 20 item 5: --help

def test_help_tells_the_whole_story(gen, capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ('"prompt"', '"seed"', '"negative_prompt"', "PPPPP-IIII.png", "manifest.jsonl", "Resume",
                   "the same command again", "out/", "64x64", "tiny", "Hub repo id", "512x512",
                   "accelerate only to run several processes"):
        assert needle in text, needle


# ------------------------------------------------------------------------- issue 20 item 8: fp16 on CPU

def test_fp16_on_the_cpu_is_explained_once(gen, tmp_path, capfd):
    folder = generate(gen, "--dtype", "fp16", "--out", str(tmp_path), *SMALL)
    err = capfd.readouterr().err
    assert err.count("--dtype fp16 on the CPU runs") == 1
    assert "will fail" not in err
    assert {r["dtype"] for r in manifest(folder)} == {"fp16"}


# -------------------------------------------------------------------- issue 20 item 9: without accelerate

def test_runs_without_accelerate(gen, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    folder = generate(gen, "--out", str(tmp_path), *SMALL)
    assert len(list(folder.glob("*.png"))) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "2 processes need accelerate: pip install accelerate" in one_line(error_of(gen, ["--device", "cpu"]))


def test_missing_transformers_is_one_line(gen, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    message = one_line(error_of(gen, ["--device", "cpu"]))
    assert "needs transformers, not installed here: pip install transformers" in message


# ------------------------------------------------------------------------------ bad prompts (in process)

@pytest.mark.parametrize("text,expected", [
    ("", "has no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "cut\n', "line 2: not valid JSON"),
    ('{"prompt": "ok"}\n{"promt": "typo"}\n', "line 2: unknown key(s) ['promt']"),
    ('{"seed": 3}\n', 'line 1: needs a non-empty string "prompt"'),
    ('{"prompt": "a", "seed": "3"}\n', 'line 1: "seed" must be an integer from 0'),
    ('{"prompt": "a", "seed": -1}\n', 'line 1: "seed" must be an integer from 0'),
    ('["a"]\n', "line 1: expected a JSON object"),
])
def test_bad_prompts_file_is_refused_clearly(gen, tmp_path, text, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    message = error_of(gen, ["--prompts", str(path), "--out", str(tmp_path / "out")])
    assert message.startswith("generate.py: error: ") and expected in message and str(path) in message
    assert not (tmp_path / "out").exists()


def test_missing_prompts_file_and_bad_arguments(gen, tmp_path, capsys):
    assert "cannot read prompts file" in error_of(gen, ["--prompts", str(tmp_path / "nope.txt")])
    assert "multiple of 8" in one_line(error_of(gen, ["--height", "60"]))
    assert "not both" in one_line(error_of(gen, ["a cat", "--prompts", "x.txt"]))
    assert "a plain folder name" in one_line(error_of(gen, ["--name", "../x"]))


def test_plain_text_prompts_file(gen, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    args = gen.parse_args(["--prompts", str(path), "--negative-prompt", "fog"])
    assert gen.load_prompts(args) == [{"prompt": "a cat", "negative_prompt": "fog"},
                                      {"prompt": "a dog", "negative_prompt": "fog"}]


# ------------------------------------------------------------------- issue 23: the fast path per process
def test_fast_path_on_the_cpu_times_the_first_batch_apart_and_shares_the_plain_runs_folder(gen, tmp_path, capsys):
    small = ["--out", str(tmp_path), *[a if a != "2" or k != SMALL.index("--num-images-per-prompt") + 1 else "3"
                                       for k, a in enumerate(SMALL)]]
    gen.main([*small, "--fast-path"])
    err = capsys.readouterr().err
    (fast,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "fast_path" not in json.loads((fast / "run.json").read_text())  # nothing changed: the plain settings
    assert "--fast-path: no CUDA device (cpu), so it changes nothing" in err  # on the CPU it says why
    assert re.search(r"first batch 1 image in [0-9.]+ s \(warm-up included\); then 2 images at [0-9.]+ img/s", err)
    gen.main(small)  # the plain run's images are these: it resumes in the same folder
    assert "3 images (3 already there)" in capsys.readouterr().out
