"""The benchmark (``python -m bench``): the tiny CPU run end to end (as CI runs it), its timing core on a
pipeline that is not ours, the largest-batch search, and refusal of bad options."""
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import pipeline as bench

ROOT = Path(__file__).resolve().parent.parent


def _dispatcher_present():
    try:
        from diffusers.flash.attention import dispatch as attention_dispatch  # noqa: F401
    except ImportError:
        return False
    return True


def _run(*args, timeout=600):  # a guard against a hang, not a speed test: a loaded 2-core machine is slow
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("DIFFUSERS_ATTENTION_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.mark.slow
def test_tiny_pipeline_run_reports_every_row(tmp_path):
    out_json, charts = tmp_path / "bench.json", tmp_path / "charts"
    args = ["--tiny", "--batch-sizes", "1,2", "--repeats", "2", "--backends", "installed,math,auto,flash-attn",
            "--json", str(out_json), "--no-progress"]
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = _run(*args, "--charts", str(charts))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if not have_mpl:  # the table and the JSON are written, then a clear message
        assert proc.returncode == 2 and "matplotlib" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        for name in ("throughput.png", "memory.png"):
            assert (charts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cpu_s < 60, f"the tiny run took {cpu_s:.0f} s of CPU"  # CPU time: wall time depends on the neighbours
    report = json.loads(out_json.read_text())
    assert report["complete"] is True and report["kind"] == "pipeline"

    m = report["machine"]
    assert m["card"].startswith("CPU") and m["torch"] == torch.__version__ and m["date"]
    assert "-m bench --tiny" in m["command"] and "--batch-sizes 1,2" in m["command"]
    c = report["config"]
    from diffusers.flash import local_pipelines

    # 128 px is 16x16 latents where the pipeline counts 8 pixels a latent (0.4-0.9); from 0.10 it counts the
    # tiny VAE's own 2, and --tiny keeps the same latents (32 px)
    factor = getattr(local_pipelines.stable_diffusion("tiny"), "vae_scale_factor", 8)
    assert (c["device"], c["dtype"], c["steps"], c["height"]) == ("cpu", "fp32", 3, 16 * factor)
    assert report["matmul_peak"]["tflops"] > 0
    work = report["work"]
    assert work["unet_calls"] >= c["steps"] and work["unet_step_tflop"] > 0 and work["vae_decode_tflop"] > 0
    assert work["tflop_per_image"] == pytest.approx(work["unet_calls"] * work["unet_step_tflop"]
                                                    + work["vae_decode_tflop"] + work["text_encode_tflop"])

    rows = report["rows"]
    measured = ["installed", "math", "auto"] if _dispatcher_present() else ["installed"]
    for name in measured:
        got = [r for r in rows if r["backend"] == name]
        assert [r["images"] for r in got] == [1, 2] and all(r["status"] == "ok" for r in got), got
        for r in got:
            assert r["img_per_s"] > 0 and r["s_per_img"] == pytest.approx(1 / r["img_per_s"])
            assert r["wall_s"] == pytest.approx(r["images"] * r["s_per_img"]) and len(r["wall_s_runs"]) == 2
            assert r["unet_step_ms"] > 0 and r["vae_decode_ms"] > 0 and r["text_encode_ms"] > 0
            assert r["unet_calls"] == work["unet_calls"] and r["image_shape"][-1] == 3
            assert r["unet_step_ms"] * r["unet_calls"] < r["wall_s"] * 1e3  # a part of the whole
            assert 0 < r["floor_share"] < 1 and r["peak_mem_gib"] is None  # no CUDA: no peak memory
    skipped = {r["backend"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "flash-attn" in skipped  # no CUDA here, or no dispatcher
    if not _dispatcher_present():
        assert set(skipped) == {"math", "auto", "flash-attn"}
        assert all("attention_dispatch" in why for why in skipped.values())
    assert "| backend | imgs | img/s | s/img | UNet step ms |" in proc.stdout and m["command"] in proc.stdout


@pytest.mark.slow
def test_attention_microbenchmark_tiny(tmp_path):
    out_json = tmp_path / "attention.json"
    proc = _run("attention", "--tiny", "--repeats", "2", "--backends", "math,auto,sdpa-cudnn", "--json", str(out_json))
    if not _dispatcher_present():
        assert proc.returncode == 2 and "attention_dispatch is not available" in proc.stderr, proc.stderr[-2000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert len(rows) == 3 * 7 and {r["head_dim"] for r in rows} == {40, 80, 160, 512}
    for r in rows:
        if r["backend"] == "sdpa-cudnn":
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
        else:
            assert r["status"] == "ok" and r["ms"] > 0
            flops = 4 * r["batch"] * r["heads"] * r["q_len"] * r["kv_len"] * r["head_dim"]
            assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
        assert r["auto_choice"] in ("math", "sdpa", "sdpa-efficient")
    assert "auto chose" in proc.stdout


def test_attention_microbenchmark_todays_shapes():
    """--today: SDXL's, SD3 medium's joint and Flux.1-dev's attention at 1024x1024, instead of SD 1.x's."""
    from bench import attention

    today = attention.shapes(tiny=False, today=True)
    assert ("SD3 joint, 1 image", 2, 24, 4096 + 333, 4096 + 333, 64, False) in today
    assert ("Flux joint, 1 image", 1, 24, 4096 + 512, 4096 + 512, 128, False) in today
    assert not set(today) & set(attention.shapes(tiny=False))
    assert attention.parse(["--today"]).today and not attention.parse([]).today


def test_find_max_batch_doubles_then_bisects():
    for largest in (1, 5, 37, 48, 192, 1000):
        probes = []
        fits = lambda n, probes=probes, largest=largest: probes.append(n) or n <= largest  # noqa: E731
        assert bench.find_max_batch(fits, limit=1024) == largest
        assert len(probes) <= 2 * largest.bit_length() + 2, probes
    assert bench.find_max_batch(lambda n: True, limit=100) == 100
    assert bench.find_max_batch(lambda n: False) == 0


class _Sleep(torch.nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


class _FakePipeline:
    """Not a diffusers pipeline: the same __call__ signature and parts, known durations."""

    def __init__(self, unet_s=0.02, decode_s=0.03):
        self.unet, self.text_encoder = _Sleep(unet_s), torch.nn.Identity()
        self.vae = types.SimpleNamespace(decode=lambda x: time.sleep(decode_s) or x)
        self.calls = 0

    def __call__(self, prompt, height, width, num_inference_steps, guidance_scale, generator, output_type):
        self.text_encoder(torch.zeros(1))
        for _ in range(num_inference_steps):
            self.unet(torch.zeros(1))
        self.vae.decode(None)
        self.calls += 1
        return types.SimpleNamespace(images=torch.zeros(len(prompt), height, width, 3))


def test_external_pipeline_is_built_from_the_installed_classes():
    """--external-diffusers reads the SD configs from our local_pipelines file by path (any installed release)."""
    import diffusers

    pipe = bench.external_pipeline("tiny")
    assert type(pipe) is diffusers.StableDiffusionPipeline
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    from diffusers.flash import local_pipelines

    assert pipe.vae.config.block_out_channels == list(local_pipelines.CONFIGS["tiny"]["vae"]["block_out_channels"])


def test_saved_random_weights_are_timed_with_model_and_rows_count_nonfinite_pixels(tmp_path, capsys):
    """--save-model writes the random-weight pipeline once (so that the fork and the peer time the same
    weights with --model); it refuses a folder with files in it; every row says how many pixels are inf/NaN."""
    target = tmp_path / "sd"
    assert bench.main(["--save-model", str(target), "--tiny"]) == 0
    assert (target / "model_index.json").is_file() and (target / "unet" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    with pytest.raises(SystemExit):
        bench.main(["--save-model", str(target), "--tiny"])
    assert "exists and is not an empty folder" in capsys.readouterr().err
    out_json = tmp_path / "r.json"
    assert bench.main(["--model", str(target), "--device", "cpu", "--backends", "auto", "--batch-sizes", "1",
                       "--steps", "2", "--warmup-steps", "0", "--repeats", "1", "--height", "32", "--width", "32",
                       "--no-flops", "--no-progress", "--json", str(out_json)]) == 0
    row = json.loads(out_json.read_text())["rows"][0]
    assert row["status"] == "ok" and row["nonfinite_share"] == 0.0
    assert "non-finite %" in capsys.readouterr().out


def test_nonfinite_share_counts_inf_and_nan():
    import numpy as np

    pixels = np.zeros((2, 2, 2, 3), dtype=np.float32)
    pixels[0, 0, 0] = [np.nan, np.inf, 0.5]
    assert bench.nonfinite_share(pixels) == pytest.approx(2 / 24)
    assert bench.nonfinite_share(np.zeros((1, 2, 2, 3))) == 0.0


def test_time_pipeline_on_any_pipeline_object():
    pipe = _FakePipeline()
    r = bench.time_pipeline(pipe, 3, steps=4, height=16, width=16, repeats=2, warmup_steps=1, device="cpu")
    assert pipe.calls == 3 and r["unet_calls"] == 4
    assert 20 <= r["unet_step_ms"] < 200 and 30 <= r["vae_decode_ms"] < 300
    assert r["wall_s"] >= 0.11 and r["img_per_s"] == pytest.approx(3 / r["wall_s"])
    assert pipe.vae.decode.__name__ == "<lambda>"  # the timer's wrapper is gone
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_fits_catches_only_out_of_memory():
    class Raising(_FakePipeline):
        def __init__(self, error):
            super().__init__(0, 0)
            self.error = error

        def __call__(self, *args, **kwargs):
            raise self.error

    assert bench.fits(Raising(torch.cuda.OutOfMemoryError("CUDA out of memory")), 4, 2, 64, 64, 7.5, "cpu") is False
    with pytest.raises(ValueError, match="boom"):
        bench.fits(Raising(ValueError("boom")), 4, 2, 64, 64, 7.5, "cpu")
    assert bench.fits(_FakePipeline(0, 0), 4, 2, 64, 64, 7.5, "cpu") is True


class _Oom(_FakePipeline):
    """Runs out of memory above ``largest`` images."""

    def __init__(self, largest):
        super().__init__(0, 0)
        self.largest, self.sizes = largest, []

    def __call__(self, prompt, **kwargs):
        self.sizes.append(len(prompt))
        if len(prompt) > self.largest:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(prompt, **kwargs)


@pytest.mark.slow  # whole pipelines on the CPU: seconds each
def test_find_max_batch_then_time_powers_of_two_and_the_largest():
    args = bench.parse(["--tiny", "--find-max-batch", "--backends", "installed", "--repeats", "1",
                        "--max-batch-limit", "64"])
    pipe, rows = _Oom(largest=11), []
    largest = bench.measure_backend(pipe, "installed", args, bench.progress(0, True, ""), rows.append)
    assert largest == 11 and [r["images"] for r in rows] == [1, 2, 4, 8, 11]
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in rows)
    assert 16 in pipe.sizes and max(pipe.sizes) == 16  # doubled to 16, then bisected between 8 and 16

    rows = []
    assert bench.measure_backend(_Oom(largest=0), "installed", args, bench.progress(0, True, ""), rows.append) == 0
    assert [(r["images"], r["status"]) for r in rows] == [(1, "oom")] and "out of memory" in rows[0]["reason"]


def test_failed_rows_say_why():
    assert bench.failed_row("math", 8, torch.cuda.OutOfMemoryError("CUDA out of memory"))["status"] == "oom"
    row = bench.failed_row("math", 8, ValueError("bad shape\nmore"))
    assert (row["status"], row["reason"]) == ("error", "ValueError: bad shape")
    if _dispatcher_present():
        from diffusers.flash.attention.dispatch import AttentionBackendError

        row = bench.failed_row("sdpa-flash", 1, AttentionBackendError("head dim 512 > 256"))
        assert row["status"] == "refused" and "head dim 512" in row["reason"]


def test_safety_checker_left_out_but_images_kept():
    pipe = types.SimpleNamespace(safety_checker=object(), feature_extractor=object())
    assert "pass-through" in bench.drop_safety_checker(pipe)
    images = torch.rand(2, 8, 8, 3).numpy()
    features = pipe.feature_extractor(pipe.numpy_to_pil(images), return_tensors="pt")
    clip = features.to("cpu").pixel_values.to(torch.float16)
    out, flagged = pipe.safety_checker(images=images, clip_input=clip)
    assert out is images and flagged == [False, False]
    newer = types.SimpleNamespace(safety_checker=object(), config={"requires_safety_checker": True})
    assert "None" in bench.drop_safety_checker(newer) and newer.safety_checker is None  # skipped by the pipeline


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--batch-sizes", "0,2"], "positive integers"),
    (["--tiny", "--batch-sizes", "a"], "positive integers"),
    (["--tiny", "--backends", "flash"], "unknown attention backend"),
    (["--tiny", "--backends", ""], "--backends is empty"),
    (["--tiny", "--backends", "auto+unet"], "unknown attention backend"),
    (["--tiny", "--backends", "auto+compile-unet"], "unknown attention backend"),
    (["--tiny", "--backends", "auto+compile-graphs-graphs"], "unknown attention backend"),
    (["--tiny", "--backends", "installed+compile"], "unknown attention backend"),
    (["--tiny", "--height", "100"], "multiples of 8"),
    (["--tiny", "--repeats", "0"], "--repeats must be at least 1"),
    (["--tiny", "--dtype", "fp16"], "half precision needs CUDA"),
    (["--external-diffusers", "--backends", "sdpa"], "only --backends installed"),
    (["--tiny", "--model", "x"], "exclude each other"),
    (["--tiny", "--inductor", "no_such_option=1"], "inductor config option"),
    (["--tiny", "--inductor", "pattern_matcher"], "KEY=VALUE"),
    (["--external-diffusers", "--backends", "installed", "--inductor", "pattern_matcher=True"], "has none"),
])
def test_bad_options_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("defaults differ with CUDA")
    args = bench.parse(["--backends", "auto,installed"])
    assert args.tiny and (args.device, args.dtype, args.steps, args.height) == ("cpu", "fp32", 3, 128)
    assert args.backends == ["installed", "auto"] and args.batch_sizes == [1, 2]  # installed first
    assert "tiny configuration" in capsys.readouterr().err


def test_fast_path_suffixes_are_accepted():
    names = ["auto+graphs", "sdpa+compile", "auto+regional", "auto+compile-graphs", "auto+compile-regional"]
    assert bench.parse(["--tiny", "--backends", ",".join(names)]).backends == names
    assert [bench.fast_path_modes(n.partition("+")[2]) for n in names] == [
        (False, None), (True, None), ("regional", None), (True, False), (True, "regional")]


def test_inductor_options_and_compile_times(tmp_path):
    """--inductor reaches the fast path's compile options and the report; --compile-times writes the
    breakdown (here empty of compiles: no CUDA, so the fast path does not apply)."""
    from diffusers.flash.fastpath import engine as fast_path

    args = bench.parse(["--tiny", "--inductor", "pattern_matcher=True", "--inductor", "conv_1x1_as_mm=False"])
    assert args.inductor == {"pattern_matcher": True, "conv_1x1_as_mm": False}
    saved = dict(fast_path.INDUCTOR_OPTIONS)
    try:
        out, times = tmp_path / "r.json", tmp_path / "times.txt"
        assert bench.main(["--tiny", "--batch-sizes", "1", "--repeats", "1", "--backends", "auto", "--no-progress",
                           "--no-flops", "--inductor", "pattern_matcher=True", "--json", str(out),
                           "--compile-times", str(times)]) == 0
        assert json.loads(out.read_text())["config"]["inductor_options"]["pattern_matcher"] is True
        assert "TorchDynamo compilation metrics" in times.read_text()
    finally:
        fast_path.INDUCTOR_OPTIONS.clear()
        fast_path.INDUCTOR_OPTIONS.update(saved)


# ---------------------------------------------------------------------------------------------- coldstart
def test_coldstart_options_and_table(capsys):
    from bench import coldstart

    args = coldstart.parse(["--tiny", "--batch-sizes", "8,1", "--modes", "cache-load,cache-write", "--steps", "3"])
    assert args.batch_sizes == [1, 8] and args.modes == ["cache-load", "cache-write"] and args.steps == 3
    for argv, message in ((["--tiny", "--modes", "fast"], "unknown 'fast'"),
                          (["--tiny", "--modes", "cache-load"], "give both"),
                          (["--tiny", "--modes", "artifacts-load,cache-write"], "artifacts-write writes: give both"),
                          (["--tiny", "--batch-sizes", "0"], "positive integers"),
                          (["--tiny", "--steps", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            coldstart.parse(argv)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            coldstart.parse([])
        assert "no CUDA device" in capsys.readouterr().err
    machine = dict(card="H200", driver="570", torch="2.13", cuda="12.8", cudnn=91000, diffusers="0.4.2",
                   transformers="4.5", python="3.11", date="2026-01-01", command="python -m bench coldstart",
                   attention_env=None)
    report = dict(machine=machine, config=dict(steps=2, dtype="fp16", size=512, model="SD 1.x, random weights"), rows=[
        dict(mode="helper", images=1, status="ok", warmup_s=61.2, then_s=0.31, models_s={"UNet step": 50.1},
             helper={"1x4x64x64": "compiled"}, cache=None),
        dict(mode="cache-load", images=1, status="ok", warmup_s=14.0, then_s=0.3, models_s={}, helper={},
             cache=dict(loaded=True, problem=None, written=0, precompiled=dict(loaded=1, compiled=0, problems=[]))),
        dict(mode="artifacts-load", images=1, status="ok", warmup_s=19.0, then_s=0.3, models_s={}, helper={},
             cache=dict(loaded=True, problem=None, written=0)),
        dict(mode="no-helper", images=8, status="error", reason="exit status 1: boom")])
    text = coldstart.render(report)
    assert "first call of 2 steps (not 50" in text and "# card: H200" in text
    assert "| helper | 1 | 61.2 | 50.1 | - | 0.31 | 1x4x64x64: compiled | - | - | ok |" in text
    assert "| cache-load | 1 | 14.0 | - | - | 0.30 | - | loaded, written 0x | loaded 1 | ok |" in text
    assert "| artifacts-load | 1 | 19.0 | - | - | 0.30 | - | loaded, written 0x | - | ok |" in text
    assert "| no-helper | 8 | - |" in text and "error: exit status 1: boom" in text


def test_coldstart_keeps_each_childs_log_where_asked(tmp_path, monkeypatch):
    """--logs DIR: each child's stderr (TORCH_LOGS' cache-key lines, when set) lands in DIR/MODE-IMAGES.log,
    and the child's own caches are empty folders of its own."""
    from bench import coldstart

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"warmup_s": 1.5}\n', stderr="key parts\n")

    monkeypatch.setattr(coldstart.subprocess, "run", fake_run)
    job = dict(mode="cache-load", images=8)
    row = coldstart.run_one(job, str(tmp_path), str(tmp_path / "logs"))
    assert row["status"] == "ok" and row["warmup_s"] == 1.5
    assert (tmp_path / "logs" / "cache-load-8.log").read_text() == "key parts\n"
    assert seen["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
    assert not (tmp_path / "no-logs").exists() and coldstart.run_one(job, str(tmp_path))["status"] == "ok"
    assert coldstart.parse(["--tiny", "--logs", "d"]).logs == "d"


@pytest.mark.slow
def test_coldstart_tiny_runs_each_mode_in_a_new_process(tmp_path):
    out = tmp_path / "cold.json"
    proc = _run("coldstart", "--tiny", "--batch-sizes", "1", "--modes",
                "no-helper,cache-write,cache-load,artifacts-write,artifacts-load",
                "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["kind"] == "coldstart" and report["machine"]["date"]
    rows = report["rows"]
    assert [(r["mode"], r["images"], r["status"]) for r in rows] == [
        ("no-helper", 1, "ok"), ("cache-write", 1, "ok"), ("cache-load", 1, "ok"), ("artifacts-write", 1, "ok"),
        ("artifacts-load", 1, "ok")], rows
    assert all(r["warmup_s"] > 0 and r["then_s"] > 0 for r in rows)
    assert "no CUDA device" in rows[0]["applied"]["reasons"][0]  # the CPU: the fast path does not apply
    assert "| cache-load | 1 |" in proc.stdout and "first call of 2 steps" in proc.stdout


def test_the_peer_at_its_best_follows_upstreams_recipe_and_runs_last(monkeypatch):
    """installed+best: inductor flags, channels-last UNet and VAE, fuse_qkv_projections where the pipeline has it,
    the UNet and vae.decode compiled (mode and fullgraph as upstream's fp16.md); after every other row."""
    import torch._inductor.config as inductor_config

    from bench import models

    args = bench.parse(["--tiny", "--external-diffusers", "--backends", "installed+best,installed+reduce-overhead,"
                        "installed"])
    assert args.backends == ["installed", "installed+reduce-overhead", "installed+best"]
    assert args.best_mode == "max-autotune"
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)
    pipe = bench.external_pipeline("tiny")
    unet, decode = pipe.unet, pipe.vae.decode
    # the config's own patch() puts the flags back (monkeypatch's undo would leave them hidden: they would
    # then read as missing for the rest of the run)
    with inductor_config.patch({k: getattr(inductor_config, k) for k in models.BEST_INDUCTOR}):
        done = models.apply_best(pipe, "max-autotune")
        assert all(getattr(inductor_config, k) == v for k, v in models.BEST_INDUCTOR.items())
    assert {fn for fn, _ in compiled} == {unet, decode}
    assert all(kw == {"mode": "max-autotune", "fullgraph": True} for _, kw in compiled)
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert "channels-last UNet" in done and "channels-last VAE" in done


def test_bench_models_rows_each_name_their_backend(monkeypatch):
    """``bench models``' fork rows run in one process one after another: the eager row after the math row is
    timed on ``auto``, not on the math backend the row before set (an eager row equal to math, pixel for
    pixel and in time, was this mistake: H100, Flux and SD3, 2026-12-07)."""
    from bench import models

    from diffusers.flash.attention import dispatch

    monkeypatch.delenv("DIFFUSERS_ATTENTION_BACKEND", raising=False)
    try:
        for row, expected in (("math", "math"), ("eager", dispatch.AUTO), ("math", "math"), ("fast", dispatch.AUTO)):
            models.set_row_backend(row)
            assert dispatch.backend_for(None) == expected, row
    finally:
        dispatch.set_attention_backend(None)


# ---------------------------------------------------------------------------------------------- profile
def test_profile_classes_kernels_and_flops():
    """Kernel names land in the class their work is (cuDNN's attention says "fprop" too: attention wins), and
    the FLOPs of a call are split by aten op: a convolution and a linear layer counted apart, as the formula
    gives them."""
    from bench import profile

    names = {"cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
             "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc": "convolution",
             "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "gemm",
             "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64": "gemm",
             "triton_red_fused_native_group_norm_silu_3": "normalisation",
             "triton_poi_fused_add_convolution_7": "elementwise", "kernel_unknown_thing": "other",
             "triton_tem_fused_addmm_2": "gemm", "triton_tem_fused_convolution_4": "convolution",
             "void at::native::(anonymous namespace)::vectorized_elementwise_kernel<4>": "elementwise"}
    assert {n: profile.kernel_class(n) for n in names} == names
    conv, lin = torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(16, 32)

    def fn(x, y):
        return conv(x), lin(y)

    flops = profile.flops_by_class(fn, (torch.ones(2, 4, 10, 10), torch.ones(5, 16)))
    assert flops == {"convolution": 2 * 2 * 8 * 8 * 8 * 4 * 9, "gemm": 2 * 5 * 16 * 32}, flops
    assert profile.parse(["--images", "1"]).images == 1
    assert profile.parse(["--contiguous"]).contiguous and not profile.parse([]).contiguous
    with pytest.raises(SystemExit):
        profile.parse(["--iters", "0"])


@pytest.mark.parametrize("model", ["sdxl", "sd3", "flux"])
def test_models_work_on_meta_counts_what_a_real_run_counts(model):
    """``bench models work`` counts full-size models on meta tensors, with torch's SDPA in place of the
    dispatcher: the tiny models give the same FLOPs that way as on real CPU tensors through ``math``."""
    import diffusers

    cls = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[model]
    if not hasattr(diffusers, cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls}")
    from bench import models

    meta, real = models.work(model, "tiny", "meta"), models.work(model, "tiny", "cpu")
    assert meta["denoiser_tflop"] > 0 and meta["vae_tflop"] > 0
    assert meta == pytest.approx(real, rel=1e-9), (meta, real)


def test_models_drift_measures_each_row_against_float32():
    """``bench models drift`` on the tiny Flux transformer: every bf16 row lands near, not on, the float32
    computation; a row repeated is at distance 0 from itself; a pair's distance is bounded by the triangle
    through float32."""
    import diffusers

    if not hasattr(diffusers, "FluxTransformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no FluxTransformer2DModel")
    from bench import models

    rows = (("bf16 math", "math", False), ("bf16 math again", "math", False), ("bf16 sdpa", "sdpa", False))
    report = models.drift("tiny", steps=2, image_tokens=16, text_tokens=8, rows=rows)
    vs = report["vs_float32_math"]
    assert set(vs) == {name for name, _, _ in rows}
    for name, d in vs.items():
        assert 0 < d["mean"] <= d["max"] < 1, (name, d)  # bf16 differs from float32, by a fraction of the spread
    assert report["pairs"]["bf16 math vs bf16 math again"] == {"max": 0.0, "mean": 0.0}
    pair = report["pairs"]["bf16 math vs bf16 sdpa"]
    assert pair["max"] <= vs["bf16 math"]["max"] + vs["bf16 sdpa"]["max"] + 1e-6
    with pytest.raises(ValueError, match="square number"):
        models.drift("tiny", steps=1, image_tokens=15, text_tokens=8, rows=rows[:1])


def test_models_drift_says_in_one_line_where_the_release_has_no_flux(capsys):
    import diffusers

    if hasattr(diffusers, "FluxTransformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has Flux: the drift runs (test above)")
    from bench import models

    assert models.main(["drift", "--size", "tiny", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs Flux" in err[0], err
