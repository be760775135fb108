"""Host timesteps in the eager loop (patch 0009, flash/fastpath/host_timesteps.py): on a CUDA device the
scheduler works on host timesteps and the UNet gets each one on the GPU through a pre-hook, so the loop
makes no host wait per step; the images are the ones the device timesteps give."""
import warnings

import numpy as np
import pytest
import torch

from diffusers.flash import local_pipelines
from diffusers.flash.fastpath import host_timesteps


def _run(pipe, device, steps=4, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return pipe(["a lighthouse"], num_inference_steps=steps, height=64, width=64, generator=g,
                output_type="np").images


def test_loop_device_is_the_host_only_for_cuda_with_a_unet():
    pipe = local_pipelines.stable_diffusion("tiny")
    assert host_timesteps.loop_device(pipe, "cpu") == "cpu" and not pipe.unet._forward_pre_hooks
    assert host_timesteps.loop_device(pipe, torch.device("cuda")) == "cpu"
    assert host_timesteps.loop_device(pipe, "cuda:0") == "cpu"
    assert len(pipe.unet._forward_pre_hooks) == 1  # installed once per UNet
    assert host_timesteps.loop_device(type("NoUNet", (), {})(), "cuda") == "cuda"
    assert not host_timesteps.attach(None)


def test_the_hook_leaves_host_calls_as_they_are():
    """On the CPU (or for a Python number) the timestep passes untouched, by position or by keyword."""
    pipe = local_pipelines.stable_diffusion("tiny")
    unet = pipe.unet.eval()
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    states = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(sample, torch.tensor(10), states).sample
        assert host_timesteps.attach(unet)
        by_position = unet(sample, torch.tensor(10), states).sample
        by_keyword = unet(sample=sample, timestep=10, encoder_hidden_states=states).sample
    torch.testing.assert_close(by_position, before, rtol=0, atol=0)
    torch.testing.assert_close(by_keyword, before, rtol=0, atol=0)
    t = torch.tensor(3)
    assert host_timesteps.to_sample_device(t, sample) is t and host_timesteps.to_sample_device(3, None) == 3


def _syncs(fn):
    """The host waits for the GPU made while ``fn`` runs, as (file, line) of each (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "lms"])
def test_eager_loop_waits_no_more_per_step_and_gives_the_same_images(monkeypatch, scheduler):
    pipe = local_pipelines.stable_diffusion("tiny", scheduler=scheduler).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    assert pipe._timesteps_device == "cpu"
    _run(pipe, "cuda")  # warm-up: first calls allocate and pick kernels
    host4, syncs4 = _syncs(lambda: _run(pipe, "cuda", 4))
    host8, syncs8 = _syncs(lambda: _run(pipe, "cuda", 8))
    # the waits of a call (text encoder, the image to the host, a first pinned buffer) do not grow with the steps
    assert len(syncs8) <= len(syncs4), f"4 steps: {len(syncs4)} waits, 8 steps: {len(syncs8)}: {sorted(set(syncs8))}"

    # upstream's way, timesteps on the GPU: the same images, and (the check can fail) waits that do grow
    monkeypatch.setattr(host_timesteps, "loop_device", lambda pipe, device: device)
    assert pipe._timesteps_device != "cpu"
    device4, up4 = _syncs(lambda: _run(pipe, "cuda", 4))
    device8, up8 = _syncs(lambda: _run(pipe, "cuda", 8))
    print(f"{scheduler}: waits per call at 4/8 steps: host timesteps {len(syncs4)}/{len(syncs8)}, "
          f"device timesteps {len(up4)}/{len(up8)}; largest difference {np.abs(host8 - device8).max()}")
    assert len(up8) > len(up4)
    np.testing.assert_array_equal(host4, device4)
    np.testing.assert_array_equal(host8, device8)
