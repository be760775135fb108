"""The helper-process compile (compile_ahead): a helper compiles a model's fast-path call into inductor's
on-disk cache, this process's own compile of the same call then finds it there (checked with inductor's
counters) and gives the eager output; a helper that cannot do its work, or could not match this process's
compile, is reported and changes nothing. Run on the CPU (inductor's C++ backend): the mechanism is the same
as on CUDA, where the fast path starts it."""
import logging as pylogging
import subprocess
import sys
import time

import pytest
import torch

from diffusers.flash.fastpath import compile_ahead
from diffusers.flash.fastpath import engine as fast_path
from diffusers.flash import local_pipelines
from diffusers.flash.attention import dispatch as attention_dispatch

SHAPE = (1, 4, 8, 8)
TARGET = "diffusers.flash.fastpath.engine:compile_in_helper"


@pytest.fixture(autouse=True)
def _log_reaches_caplog():
    """diffusers' logger does not propagate by default, so caplog would see nothing: on during each test."""
    root = pylogging.getLogger("diffusers")
    before, root.propagate = root.propagate, True
    yield
    root.propagate = before


def _vae():
    return local_pipelines.components("tiny")["vae"].eval()


def _no_cpp_compiler():
    """Why inductor's CPU backend cannot compile here (no C++ compiler), or None: then compiling is expected
    to work, and a compile that fails is a failure, not a skip."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # an older torch: look for the compiler inductor would call
        import os
        import shutil

        cxx = os.environ.get("CXX", "g++")
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for inductor's CPU backend"
    try:
        get_cpp_compiler()
    except Exception as e:
        return f"inductor finds no C++ compiler for its CPU backend ({type(e).__name__}: {e})"
    return None


def _extra(options=None, channels_last=True):
    options = dict(fast_path.INDUCTOR_OPTIONS if options is None else options)
    return lambda: {"mode": True, "options": options, "channels_last": channels_last,
                    "inductor_config": fast_path.inductor_config()}


def _ahead(model=None, extra=None, counts=fast_path.cache_counts):
    return compile_ahead.Ahead(model or _vae(), "decode", "VAE decode", TARGET, extra or _extra(), counts)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 1)  # CI has 2 cores
    torch._dynamo.reset()
    yield tmp_path / "inductor"
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_helper_compiles_into_the_cache_this_process_then_reads(fresh_cache, caplog):
    reason = _no_cpp_compiler()
    if reason:
        pytest.skip(reason)
    vae = _vae()
    ahead = _ahead(vae)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(SHAPE)
        assert SHAPE in ahead.helpers, ahead.done
        helper = ahead.helpers[SHAPE][0]
        helper.proc.wait(timeout=300)  # as in a fresh process: done before the UNet's compile
        ahead.wait(SHAPE)
        assert ahead.done[SHAPE] is None, ahead.done[SHAPE]
        assert "the helper has compiled the VAE decode" in caplog.text
        assert any(fresh_cache.rglob("*")), "the helper wrote nothing to inductor's cache"

        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager = vae.decode(z).sample
        report = fast_path._report()
        fast_path.apply_to(vae, "VAE decode", "decode", True, report, cuda_graphs=False)
        with torch.no_grad():
            out = vae.decode(z).sample
        assert vae.decode.failed is None, f"torch.compile failed where it should work: {vae.decode.failed}"
        ahead.check(SHAPE)
    assert report["compile"] == ["VAE decode"] and report["channels_last"] == ["VAE decode"]
    assert ahead.done[SHAPE] is None, ahead.done[SHAPE]  # checked: cache hits, no miss
    assert "read the helper's work from inductor's cache" in caplog.text
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert helper.proc.stdin.closed


@pytest.mark.slow
def test_a_helper_that_fails_is_reported_and_waited_for_once(fresh_cache, caplog):
    ahead = _ahead(extra=_extra({"no_such_inductor_option": 1}, channels_last=False))
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(SHAPE)
        ahead.helpers[SHAPE][0].proc.wait(timeout=300)
        ahead.wait(SHAPE)
        ahead.wait(SHAPE)  # nothing left to wait for: the reason stays
    reason = ahead.done[SHAPE]
    assert reason.startswith("exit status 3") and "no_such_inductor_option" in reason, reason
    assert len(reason) < compile_ahead.REASON_CHARS + 40
    assert "did not compile the VAE decode" in caplog.text and "it compiles here" in caplog.text


@pytest.mark.slow
def test_a_helper_ends_when_this_process_closes_its_stdin(fresh_cache):
    """However this process ends (killed included), the helper's stdin closes and it exits."""
    spec = compile_ahead.spec_for(_vae(), "decode", "VAE decode", SHAPE, "time:sleep", {})
    helper = compile_ahead.Helper(spec)  # would build the VAE, then fail: time.sleep(model, spec)
    time.sleep(0.5)
    helper.proc.stdin.close()
    assert helper.proc.wait(timeout=120) == 5


def test_no_helper_with_too_few_cores_or_under_autocast(caplog, monkeypatch):
    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 1)
    ahead = _ahead()
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ahead.start(SHAPE)
    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 10**6)
    ahead.start((3, 4, 8, 8))
    assert ahead.helpers == {}
    assert "autocast" in ahead.done[SHAPE] and "CPU cores" in ahead.done[(3, 4, 8, 8)]
    assert "compiles in this process (no helper" in caplog.text


def test_the_spec_mirrors_the_model_the_backends_and_the_flags():
    vae = _vae()
    vae.set_attention_backend("math")
    spec = compile_ahead.spec_for(vae, "decode", "VAE decode", (2, 4, 8, 8), TARGET, {"a": 1})
    assert spec["class"] == "AutoencoderKL" and spec["config"]["block_out_channels"] == list(
        local_pipelines.CONFIGS["tiny"]["vae"]["block_out_channels"])
    assert not any(k.startswith("_") for k in spec["config"])
    assert set(spec["backends"].values()) == {"math"} and len(spec["backends"]) >= 1
    assert spec["shape"] == [2, 4, 8, 8] and spec["target"] == TARGET and spec["extra"] == {"a": 1}
    assert spec["flags"]["cudnn.allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert spec["sdp"]["math"] == torch.backends.cuda.math_sdp_enabled()
    assert spec["deterministic"] == [torch.are_deterministic_algorithms_enabled(), False]
    assert spec["dtype"] == "float32" and spec["device"] == "cpu" and spec["training"] is False
    # the process-wide backend, where a module has none of its own
    vae = _vae()
    attention_dispatch.set_attention_backend("sdpa")
    try:
        spec = compile_ahead.spec_for(vae, "decode", "VAE decode", SHAPE, TARGET, {})
    finally:
        attention_dispatch.set_attention_backend(None)
    assert set(spec["backends"].values()) == {"sdpa"}


def test_the_helper_gets_inductor_options_as_this_process_has_them(monkeypatch):
    """The fast path's part of the spec: its inductor config, set in the helper where it differs."""
    import torch._inductor.config as config

    with config.patch(epilogue_fusion=not config.epilogue_fusion):
        wanted = fast_path.inductor_config()
    assert wanted["epilogue_fusion"] is (not config.epilogue_fusion)
    before = config.epilogue_fusion
    try:
        fast_path.set_inductor_config(wanted)
        assert config.epilogue_fusion is (not before)
    finally:
        config.epilogue_fusion = before


def test_no_spec_for_what_a_helper_could_not_build_or_match():
    class Local(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="cannot import"):
        compile_ahead.spec_for(Local(), "forward", "x", SHAPE, TARGET, {})
    vae = _vae()
    vae.decoder.conv_out.to(torch.float64)
    with pytest.raises(ValueError, match="dtypes"):
        compile_ahead.spec_for(vae, "decode", "VAE decode", SHAPE, TARGET, {})
    vae = _vae()
    vae.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="partly frozen"):
        compile_ahead.spec_for(vae, "decode", "VAE decode", SHAPE, TARGET, {})


def test_a_spec_json_cannot_hold_starts_nothing(monkeypatch):
    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 1)
    ahead = _ahead(extra=lambda: {"scaling": torch.float16})
    ahead.start(SHAPE)
    assert ahead.helpers == {} and "TypeError" in ahead.done[SHAPE]


def test_the_unet_capture_starts_the_decoder_helper_the_decoder_capture_awaits_and_checks_it(monkeypatch):
    """The fast path's hooks: the UNet's planning run before a capture starts a helper for the decoder's
    shape (half the UNet's batch when even: classifier-free guidance), the decoder's awaits it, each before
    the model's own uncompiled run, and the decoder's compile is checked after its warm-up."""
    events = []

    class Recorder:
        def __init__(self, model, attr, what, target, extra, counts):
            events.append(("new", what, target, extra()["mode"], extra()["channels_last"]))
            assert counts is fast_path.cache_counts and extra()["options"] == {"x": 1}

        def start(self, shape):
            events.append(("start", tuple(shape)))

        def wait(self, shape):
            events.append(("wait", tuple(shape)))

        def check(self, shape):
            events.append(("check", tuple(shape)))

    monkeypatch.setattr(compile_ahead, "Ahead", Recorder)
    monkeypatch.setattr(fast_path, "_on_cuda", lambda model: True)
    pipe = local_pipelines.stable_diffusion("tiny")
    parts = [("UNet", pipe.unet, "forward"), ("VAE decode", pipe.vae, "decode")]
    report = {"reasons": []}
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": False}, report, None, {}) is None
    assert fast_path._ahead(pipe, parts[:1], {"UNet": True, "VAE decode": True}, report, None, {}) is None
    monkeypatch.setattr(fast_path, "caches_on", lambda: False)
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": True}, report, None, {}) is None
    monkeypatch.setattr(fast_path, "caches_on", lambda: True)
    hooks = fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": "regional"}, report, None, {"x": 1})
    assert events == [("new", "VAE decode", TARGET, "regional", True)] and report["reasons"] == []
    unet_prepare = hooks["UNet"]["before"](lambda *a: events.append(("unet", a[0].shape[0])))
    vae_prepare = hooks["VAE decode"]["before"](lambda z: events.append(("vae", z.shape[0])))
    unet_prepare(torch.zeros(6, 4, 8, 12), torch.tensor(1), torch.zeros(6, 77, 32))
    vae_prepare(torch.zeros(3, 4, 8, 12))
    hooks["VAE decode"]["after"](torch.zeros(3, 4, 8, 12))
    unet_prepare(torch.zeros(3, 4, 8, 8), torch.tensor(1), torch.zeros(3, 77, 32))
    assert events[1:] == [("start", (3, 4, 8, 12)), ("unet", 6), ("wait", (3, 4, 8, 12)), ("vae", 3),
                          ("check", (3, 4, 8, 12)), ("start", (3, 4, 8, 8)), ("unet", 3)]


def test_a_vae_without_diffusers_config_gets_no_helper(monkeypatch):
    class PlainVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def decode(self, z):
            return z

    monkeypatch.setattr(fast_path, "_on_cuda", lambda model: True)
    monkeypatch.setattr(fast_path, "caches_on", lambda: True)
    pipe = local_pipelines.stable_diffusion("tiny")
    parts = [("UNet", pipe.unet, "forward"), ("VAE decode", PlainVAE(), "decode")]
    report = {"reasons": []}
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": True}, report, None, {}) is None
    assert "no helper process for the VAE decode's compile" in report["reasons"][0], report


class _Slow:
    """A stand-in helper that is still running."""

    def __init__(self):
        self.waited = False
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def wait(self):
        self.waited = True
        self.stop()
        return None


@pytest.mark.parametrize("counts,waited,why", [((2, 0), False, "stopped: inductor's cache is warm"),
                                                ((2, 1), True, None), ((0, 3), True, None),
                                                ((0, 0), False, "stopped: nothing was compiled here")])
def test_a_warm_cache_stops_the_helper_a_cold_one_waits_for_it(counts, waited, why):
    """When nothing compiled since the helper started missed the cache (a second process, or graphs compiled
    earlier in this one), this process compiles the decoder itself and stops the helper; after a miss (a
    fresh process) it waits for the helper."""
    ahead = _ahead(counts=lambda: counts)
    helper = _Slow()
    ahead.helpers[SHAPE] = (helper, (0, 0))
    ahead.wait(SHAPE)
    assert helper.proc.poll() is not None and helper.waited == waited and ahead.helpers == {}
    assert (ahead.done[SHAPE] is None) == waited
    assert waited or ahead.done[SHAPE].startswith(why), ahead.done[SHAPE]


def test_wrong_guesses_are_stopped_and_a_missed_check_is_reported():
    counts = [(0, 1)]
    ahead = _ahead(counts=lambda: counts[0])
    guess = _Slow()
    ahead.helpers[SHAPE] = (guess, (0, 1))
    ahead.wait((2, 4, 8, 8))  # the decoder came with another batch (no guidance)
    assert guess.proc.poll() is not None and not guess.waited
    assert ahead.done[SHAPE].startswith("stopped: the VAE decode was called for (2, 4, 8, 8)")
    assert ahead.done[(2, 4, 8, 8)].startswith("no helper")
    ahead.start((2, 4, 8, 8))  # known now: no helper started for it later
    assert ahead.helpers == {}
    # a helper that compiled, then a compile here that missed the cache anyway
    ahead.helpers[(4, 4, 8, 8)] = (_Slow(), (0, 0))
    ahead.wait((4, 4, 8, 8))
    assert ahead.done[(4, 4, 8, 8)] is None
    counts[0] = (0, 2)
    ahead.check((4, 4, 8, 8))
    assert "did not find it in inductor's cache (0 hits, 1 misses)" in ahead.done[(4, 4, 8, 8)]
    # and one whose compile here was not needed (dynamo reused a graph of this process)
    ahead.helpers[(5, 4, 8, 8)] = (_Slow(), (0, 0))
    ahead.wait((5, 4, 8, 8))
    ahead.check((5, 4, 8, 8))
    assert "needed no compile" in ahead.done[(5, 4, 8, 8)]
    # and one whose compile read it: no miss, hits
    ahead.helpers[(6, 4, 8, 8)] = (_Slow(), (0, 0))
    ahead.wait((6, 4, 8, 8))
    counts[0] = (3, 2)
    ahead.check((6, 4, 8, 8))
    assert ahead.done[(6, 4, 8, 8)] is None
