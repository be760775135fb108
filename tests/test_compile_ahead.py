"""The helper-process compile (compile_ahead): a helper compiles a model's fast-path call into inductor's
on-disk cache, this process's own compile of the same call then finds it there and gives the eager output;
a helper that cannot do its work is reported and changes nothing. Run on the CPU (inductor's C++ backend):
the mechanism is the same as on CUDA, where the fast path starts it."""
import logging as pylogging

import pytest
import torch

from diffusers import compile_ahead, fast_path, local_pipelines


def _vae():
    return local_pipelines.components("tiny")["vae"].eval()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield tmp_path / "inductor"
    torch._dynamo.reset()


def test_a_helper_compiles_into_the_cache_this_process_then_reads(fresh_cache, caplog):
    from torch._dynamo.utils import counters

    vae = _vae()
    shape = (1, vae.config.latent_channels, 8, 8)
    ahead = compile_ahead.Ahead(vae, "decode", "VAE decode", True, dict(fast_path.INDUCTOR_OPTIONS),
                                channels_last=True)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(shape)
        assert shape in ahead.helpers, ahead.done
        ahead.wait(shape)
    assert ahead.done[shape] is None, ahead.done[shape]
    assert "the helper compiled the VAE decode" in caplog.text
    assert any(fresh_cache.rglob("*")), "the helper wrote nothing to inductor's cache"

    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = vae.decode(z).sample
    report = {"cuda_graphs": [], "compile": [], "channels_last": [], "reasons": []}
    counters.clear()
    fast_path.apply_to(vae, "VAE decode", "decode", True, report, cuda_graphs=False)
    with torch.no_grad():
        out = vae.decode(z).sample
    if vae.decode.failed is not None:
        pytest.skip(f"torch.compile cannot run here: {vae.decode.failed}")
    assert report["compile"] == ["VAE decode"] and report["channels_last"] == ["VAE decode"]
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_miss"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_a_helper_that_fails_is_reported_and_waited_for_once(fresh_cache, caplog):
    vae = _vae()
    ahead = compile_ahead.Ahead(vae, "decode", "VAE decode", True, {"no_such_inductor_option": 1},
                                channels_last=False)
    shape = (1, 4, 8, 8)
    with caplog.at_level(pylogging.INFO, logger="diffusers"):
        ahead.start(shape)
        ahead.wait(shape)
        ahead.wait(shape)  # nothing left to wait for
    assert ahead.done[shape].startswith("exit status"), ahead.done[shape]
    assert "no_such_inductor_option" in ahead.done[shape] or "exit status" in caplog.text
    assert "did not compile the VAE decode" in caplog.text and "it compiles here" in caplog.text
    assert not compile_ahead._live


def test_no_helper_without_inductor_caches(caplog):
    import torch._inductor.config as config

    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    with caplog.at_level(pylogging.INFO, logger="diffusers"), config.patch(fx_graph_cache=False):
        ahead.start((1, 4, 8, 8))
    assert config.fx_graph_cache == compile_ahead.caches_on()
    assert ahead.helpers == {} and "caches are off" in ahead.done[(1, 4, 8, 8)]
    assert "compiles in this process, no helper" in caplog.text


def test_the_spec_mirrors_the_model_and_the_flags():
    vae = _vae()
    vae.set_attention_backend("math")
    spec = compile_ahead.spec_for(vae, "decode", "VAE decode", "regional", (2, 4, 8, 8), {"a": 1}, True)
    assert spec["class"] == "AutoencoderKL" and spec["config"]["block_out_channels"] == [32, 64]
    assert not any(k.startswith("_") for k in spec["config"])
    assert set(spec["backends"].values()) == {"math"} and len(spec["backends"]) >= 1
    assert spec["mode"] == "regional" and spec["shape"] == [2, 4, 8, 8] and spec["channels_last"] is True
    assert spec["flags"]["cudnn.allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert spec["dtype"] == "float32" and spec["device"] == "cpu" and spec["training"] is False


def test_the_unet_capture_starts_the_decoder_helper_and_the_decoder_capture_awaits_it(monkeypatch):
    """The fast path's hooks: the UNet's planning run before a capture starts a helper for the decoder's
    shape (half the UNet's batch when even: classifier-free guidance), the decoder's awaits it, each before
    the model's own uncompiled run."""
    events = []

    class Recorder:
        def __init__(self, model, attr, what, mode, options, channels_last):
            events.append(("new", what, mode, channels_last))

        def start(self, shape):
            events.append(("start", tuple(shape)))

        def wait(self, shape):
            events.append(("wait", tuple(shape)))

    monkeypatch.setattr(compile_ahead, "Ahead", Recorder)
    monkeypatch.setattr(fast_path, "_on_cuda", lambda model: True)
    pipe = local_pipelines.stable_diffusion("tiny")
    parts = [("UNet", pipe.unet, "forward"), ("VAE decode", pipe.vae, "decode")]
    report = {"reasons": []}
    assert fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": False}, report, None) is None
    assert fast_path._ahead(pipe, parts[:1], {"UNet": True, "VAE decode": True}, report, None) is None
    hooks = fast_path._ahead(pipe, parts, {"UNet": True, "VAE decode": "regional"}, report, None)
    assert events == [("new", "VAE decode", "regional", True)]
    unet_prepare = hooks["UNet"](lambda *a: events.append(("unet", a[0].shape[0])))
    vae_prepare = hooks["VAE decode"](lambda z: events.append(("vae", z.shape[0])))
    unet_prepare(torch.zeros(6, 4, 8, 12), torch.tensor(1), torch.zeros(6, 77, 32))
    vae_prepare(torch.zeros(3, 4, 8, 12))
    unet_prepare(torch.zeros(3, 4, 8, 8), torch.tensor(1), torch.zeros(3, 77, 32))
    assert events[1:] == [("start", (3, 4, 8, 12)), ("unet", 6), ("wait", (3, 4, 8, 12)), ("vae", 3),
                          ("start", (3, 4, 8, 8)), ("unet", 3)]


@pytest.mark.parametrize("counts,waited", [((2, 0), False), ((2, 1), True), ((0, 0), True)])
def test_a_warm_cache_stops_the_helper_a_cold_one_waits_for_it(monkeypatch, counts, waited):
    """When every compile since the helper started was a cache hit (a second process), this process reads
    the cache itself and stops the helper; after a miss (or none counted) it waits for the helper."""
    import subprocess
    import sys

    class Slow:
        shape, counts, started = (1, 4, 8, 8), (0, 0), 0.0

        def __init__(self):
            self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            self.waited = False

        def stop(self):
            self.proc.kill()
            self.proc.wait()

        def wait(self):
            self.waited = True
            self.stop()
            return None

    ahead = compile_ahead.Ahead(_vae(), "decode", "VAE decode", True, {}, channels_last=False)
    helper = ahead.helpers[Slow.shape] = Slow()
    monkeypatch.setattr(compile_ahead, "_cache_counts", lambda: counts)
    ahead.wait(Slow.shape)
    assert helper.proc.poll() is not None and helper.waited == waited and ahead.helpers == {}
    assert (ahead.done[Slow.shape] is None) == waited
    assert waited or ahead.done[Slow.shape].startswith("stopped: inductor's cache is warm")
