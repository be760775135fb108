"""The helper-process compile (compile_ahead): a helper compiles a model's fast-path call into inductor's
on-disk cache, this process's own compile of the same call then finds it there (checked with inductor's
counters) and gives the eager output; a helper that cannot do its work, or could not match this process's
compile, is reported and changes nothing. Run on the CPU (inductor's C++ backend): the mechanism is the same
as on CUDA, where the fast path starts it."""
import glob
import logging as pylogging
import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch

from diffusers import compile_ahead, fast_path, local_pipelines
from diffusers.models import attention_dispatch

SHAPE = (1, 4, 8, 8)


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


def _report():
    return {"cuda_graphs": [], "compile": [], "channels_last": [], "reasons": []}


def _spec_files():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "diffusers-flash-ahead-*")))


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
    files = _spec_files()
    ahead = compile_ahead.Ahead(vae, "decode", "VAE decode", True, dict(fast_path.INDUCTOR_OPTIONS),
                                channels_last=True)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(SHAPE)
        assert SHAPE in ahead.helpers, ahead.done
        ahead.helpers[SHAPE].proc.wait(timeout=300)  # as in a fresh process: done before the UNet's compile
        ahead.wait(SHAPE)
        assert ahead.done[SHAPE] is None, ahead.done[SHAPE]
        assert "the helper has compiled the VAE decode" in caplog.text
        assert any(fresh_cache.rglob("*")), "the helper wrote nothing to inductor's cache"

        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager = vae.decode(z).sample
        report = _report()
        fast_path.apply_to(vae, "VAE decode", "decode", True, report, cuda_graphs=False)
        with torch.no_grad():
            out = vae.decode(z).sample
        assert vae.decode.failed is None, f"torch.compile failed where it should work: {vae.decode.failed}"
        ahead.check(SHAPE)
    assert report["compile"] == ["VAE decode"] and report["channels_last"] == ["VAE decode"]
    assert ahead.done[SHAPE] is None, ahead.done[SHAPE]  # checked: cache hits, no miss
    assert "read the helper's work from inductor's cache" in caplog.text
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert _spec_files() == files and not compile_ahead._live
    # the compile is noted in inductor's cache folder: a later process (here: dynamo's caches emptied, a new
    # VAE of the same config) starts no helper, and its own compile reads the cache
    note = ahead.notes[SHAPE]
    assert note is not None and os.path.exists(note) and note.startswith(str(fresh_cache))
    torch._dynamo.reset()
    vae2 = _vae()
    later = compile_ahead.Ahead(vae2, "decode", "VAE decode", True, dict(fast_path.INDUCTOR_OPTIONS),
                                channels_last=True)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        later.start(SHAPE)
        assert later.helpers == {} and later.done[SHAPE] == compile_ahead.CACHED
        later.wait(SHAPE)
        fast_path.apply_to(vae2, "VAE decode", "decode", True, _report(), cuda_graphs=False)
        with torch.no_grad():
            vae2.decode(z)
        later.check(SHAPE)
    assert later.done[SHAPE] == compile_ahead.CACHED, later.done[SHAPE]
    assert "read an earlier compile from inductor's cache" in caplog.text
    assert _spec_files() == files and not compile_ahead._live


def test_a_note_whose_compile_is_gone_is_reported_and_written_again(fresh_cache, monkeypatch, caplog):
    """A note names the compile by everything the helper mirrors; when the cache no longer holds it, this
    process compiles (as without a helper), says so and notes it again."""
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    spec = compile_ahead.spec_for(ahead.model, "decode", "VAE decode", True, SHAPE, {}, False)
    note = compile_ahead.note_path(spec)
    assert note == compile_ahead.note_path(dict(spec))  # the same spec, the same note
    assert note != compile_ahead.note_path({**spec, "shape": [2, 4, 8, 8]})
    assert note != compile_ahead.note_path({**spec, "inductor": {"max_autotune": True}})
    digest = compile_ahead._source_digest
    monkeypatch.setattr(compile_ahead, "_source_digest", lambda: "another version of this package's code")
    assert note != compile_ahead.note_path(spec)  # the fork's code changed, its version string did not
    monkeypatch.setattr(compile_ahead, "_source_digest", digest)
    digest.cache_clear()
    assert note == compile_ahead.note_path(spec)  # the digest, computed again, is the same
    os.makedirs(os.path.dirname(note))
    open(note, "w").close()
    counts = iter([(0, 0), (1, 2)])
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: next(counts))
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(SHAPE)
        assert ahead.helpers == {} and ahead.done[SHAPE] == compile_ahead.CACHED
        os.remove(note)
        ahead.wait(SHAPE)
        ahead.check(SHAPE)
    assert "noted but not found in inductor's cache (1 hits, 2 misses)" in ahead.done[SHAPE], ahead.done[SHAPE]
    assert "noted but not found" in caplog.text
    assert os.path.exists(note)  # this process's compile is in the cache now
    assert fast_path.helper_results(types.SimpleNamespace(_fast_path_ahead=ahead)) == {"1x4x8x8": ahead.done[SHAPE]}


def test_no_note_where_nothing_compiled_or_the_folder_is_read_only(fresh_cache, monkeypatch):
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    ahead.helpers[SHAPE] = _Slow()
    ahead.notes[SHAPE] = note = str(fresh_cache / compile_ahead.NOTES / "x")
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: (0, 0))  # dynamo reused a graph: no compile
    ahead.wait(SHAPE)
    ahead.check(SHAPE)
    assert not os.path.exists(note)
    ahead.notes[(2, 4, 8, 8)] = "/proc/no-such-folder/x"  # cannot be written: logged, nothing raised
    ahead.done[(2, 4, 8, 8)] = "no helper: test"
    counts = iter([(0, 0), (0, 1)])
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: next(counts))
    ahead.wait((2, 4, 8, 8))
    ahead.check((2, 4, 8, 8))
    assert ahead.done[(2, 4, 8, 8)] == "no helper: test"
    # a helper stopped because the cache was warm: the compile here, read from the cache, is noted
    ahead.helpers[(3, 4, 8, 8)] = _Slow((3, 4, 8, 8))
    ahead.notes[(3, 4, 8, 8)] = note = str(fresh_cache / compile_ahead.NOTES / "y")
    counts = iter([(2, 0), (2, 0), (5, 0)])
    ahead.wait((3, 4, 8, 8))
    assert ahead.done[(3, 4, 8, 8)].startswith("stopped: inductor's cache is warm") and not os.path.exists(note)
    ahead.check((3, 4, 8, 8))
    assert os.path.exists(note) and ahead.done[(3, 4, 8, 8)].startswith("stopped: ")


@pytest.mark.slow
def test_a_helper_that_fails_is_reported_and_waited_for_once(fresh_cache, caplog):
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {"no_such_inductor_option": 1},
                                channels_last=False)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(SHAPE)
        ahead.helpers[SHAPE].proc.wait(timeout=300)
        ahead.wait(SHAPE)
        ahead.wait(SHAPE)  # nothing left to wait for: the reason stays
    reason = ahead.done[SHAPE]
    assert reason.startswith("exit status") and "no_such_inductor_option" in reason, reason
    assert len(reason) < compile_ahead.REASON_CHARS + 40
    assert "did not compile the VAE decode" in caplog.text and "it compiles here" in caplog.text
    assert not compile_ahead._live


def test_no_helper_without_inductor_caches_or_under_autocast(caplog, monkeypatch):
    import torch._inductor.config as config

    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 1)
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        with config.patch(fx_graph_cache=False):
            ahead.start(SHAPE)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ahead.start((2, 4, 8, 8))
    monkeypatch.setattr(compile_ahead, "MIN_CPUS", 10**6)
    ahead.start((3, 4, 8, 8))
    assert ahead.helpers == {}
    assert "caches are off" in ahead.done[SHAPE] and "autocast" in ahead.done[(2, 4, 8, 8)]
    assert "CPU cores" in ahead.done[(3, 4, 8, 8)]
    assert "compiles in this process (no helper" in caplog.text


def test_the_spec_mirrors_the_model_the_backends_and_the_flags():
    import torch._inductor.config as config

    vae = _vae()
    vae.set_attention_backend("math")
    with config.patch(epilogue_fusion=not config.epilogue_fusion):
        spec = compile_ahead.spec_for(vae, "decode", "VAE decode", "regional", (2, 4, 8, 8), {"a": 1}, True)
    assert spec["class"] == "AutoencoderKL" and spec["config"]["block_out_channels"] == [32, 64]
    assert not any(k.startswith("_") for k in spec["config"])
    assert set(spec["backends"].values()) == {"math"} and len(spec["backends"]) >= 1
    assert spec["mode"] == "regional" and spec["shape"] == [2, 4, 8, 8] and spec["channels_last"] is True
    assert spec["inductor"] == {"a": 1} and spec["inductor_globals"] == {"epilogue_fusion": not config.epilogue_fusion}
    assert spec["flags"]["cudnn.allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert spec["sdp"]["math"] == torch.backends.cuda.math_sdp_enabled()
    assert spec["deterministic"] == [torch.are_deterministic_algorithms_enabled(), False]
    assert spec["dtype"] == "float32" and spec["device"] == "cpu" and spec["training"] is False
    # the process-wide backend, where a module has none of its own
    vae = _vae()
    attention_dispatch.set_attention_backend("sdpa")
    try:
        spec = compile_ahead.spec_for(vae, "decode", "VAE decode", True, SHAPE, {}, False)
    finally:
        attention_dispatch.set_attention_backend(None)
    assert set(spec["backends"].values()) == {"sdpa"}


def test_no_spec_for_what_a_helper_could_not_build_or_match():
    class Local(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="cannot import"):
        compile_ahead.spec_for(Local(), "forward", "x", True, SHAPE, {}, False)
    vae = _vae()
    vae.decoder.conv_out.to(torch.float64)
    with pytest.raises(ValueError, match="dtypes"):
        compile_ahead.spec_for(vae, "decode", "VAE decode", True, SHAPE, {}, False)
    vae = _vae()
    vae.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="partly frozen"):
        compile_ahead.spec_for(vae, "decode", "VAE decode", True, SHAPE, {}, False)


def test_a_spec_json_cannot_hold_leaves_no_file():
    files = _spec_files()
    spec = compile_ahead.spec_for(_vae(), "decode", "VAE decode", True, SHAPE, {}, False)
    spec["config"]["scaling"] = torch.float16
    with pytest.raises(TypeError):
        compile_ahead.Helper(spec)
    assert _spec_files() == files and not compile_ahead._live


def test_the_unet_capture_starts_the_decoder_helper_the_decoder_capture_awaits_and_checks_it(monkeypatch):
    """The fast path's hooks: the UNet's planning run before a capture starts a helper for the decoder's
    shape (half the UNet's batch when even: classifier-free guidance), the decoder's awaits it, each before
    the model's own uncompiled run, and the decoder's compile is checked after its warm-up."""
    events = []

    class Recorder:
        def __init__(self, model, attr, what, mode, options, channels_last):
            events.append(("new", what, mode, channels_last))

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
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": False}, report, None) is None
    assert fast_path._ahead(pipe, parts[:1], {"UNet": True, "VAE decode": True}, report, None) is None
    hooks = fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": "regional"}, report, None)
    assert events == [("new", "VAE decode", "regional", True)] and report["reasons"] == []
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
    pipe = local_pipelines.stable_diffusion("tiny")
    parts = [("UNet", pipe.unet, "forward"), ("VAE decode", PlainVAE(), "decode")]
    report = {"reasons": []}
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": True}, report, None) is None
    assert "no helper process for the VAE decode's compile" in report["reasons"][0], report


class _Slow:
    """A stand-in helper that is still running."""

    def __init__(self, shape=SHAPE):
        self.shape, self.counts, self.waited = shape, (0, 0), False
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
def test_a_warm_cache_stops_the_helper_a_cold_one_waits_for_it(monkeypatch, counts, waited, why):
    """When nothing compiled since the helper started missed the cache (a second process, or graphs compiled
    earlier in this one), this process compiles the decoder itself and stops the helper; after a miss (a
    fresh process) it waits for the helper."""
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    helper = ahead.helpers[SHAPE] = _Slow()
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: counts)
    ahead.wait(SHAPE)
    assert helper.proc.poll() is not None and helper.waited == waited and ahead.helpers == {}
    assert (ahead.done[SHAPE] is None) == waited
    assert waited or ahead.done[SHAPE].startswith(why), ahead.done[SHAPE]


def test_wrong_guesses_are_stopped_and_a_missed_check_is_reported(monkeypatch):
    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    guess = ahead.helpers[SHAPE] = _Slow()
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: (0, 1))
    ahead.wait((2, 4, 8, 8))  # the decoder came with another batch (no guidance)
    assert guess.proc.poll() is not None and not guess.waited
    assert ahead.done[SHAPE].startswith("stopped: the VAE decode was called for (2, 4, 8, 8)")
    assert ahead.done[(2, 4, 8, 8)].startswith("no helper")
    ahead.start((2, 4, 8, 8))  # known now: no helper started for it later
    assert ahead.helpers == {}
    # a helper that compiled, then a compile here that missed the cache anyway
    ahead.helpers[(4, 4, 8, 8)] = _Slow((4, 4, 8, 8))
    counts = iter([(0, 1), (0, 1), (0, 2)])
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: next(counts))
    ahead.wait((4, 4, 8, 8))
    assert ahead.done[(4, 4, 8, 8)] is None
    ahead.check((4, 4, 8, 8))
    assert "did not find it in inductor's cache (0 hits, 1 misses)" in ahead.done[(4, 4, 8, 8)]
    # and one whose compile here was not needed (dynamo reused a graph of this process)
    ahead.helpers[(5, 4, 8, 8)] = _Slow((5, 4, 8, 8))
    counts = iter([(0, 1), (0, 1), (0, 1)])
    ahead.wait((5, 4, 8, 8))
    ahead.check((5, 4, 8, 8))
    assert "needed no compile" in ahead.done[(5, 4, 8, 8)]
