"""The fast path: on the CPU it says why it does not apply and changes nothing; on CUDA the graphed UNet
gives the same images as the plain one and re-captures when the batch changes."""
import numpy as np
import pytest
import torch

from diffusers import local_pipelines
from diffusers.models.unet_2d_condition import UNet2DConditionModel


def _run(pipe, device, n=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return pipe(["a lighthouse"] * n, num_inference_steps=4, height=128, width=128, generator=g,
                output_type="np").images


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_without_cuda_it_explains_and_changes_nothing():
    pipe = local_pipelines.stable_diffusion("tiny")
    before = _run(pipe, "cpu")
    report = pipe.enable_fast_path()
    assert report["cuda_graphs"] == [] and "no CUDA device" in report["reasons"][0]
    assert "forward" not in pipe.unet.__dict__
    np.testing.assert_array_equal(_run(pipe, "cpu"), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_unet_gives_the_same_images():
    pipe = local_pipelines.stable_diffusion("tiny").to("cuda")
    plain = {n: _run(pipe, "cuda", n) for n in (1, 2)}
    report = pipe.enable_fast_path()
    assert report["cuda_graphs"] and isinstance(pipe.unet, UNet2DConditionModel)
    for n in (1, 2, 1):  # a new batch captures a new graph; an old one is replayed
        np.testing.assert_allclose(_run(pipe, "cuda", n), plain[n], atol=2 / 255)
    assert len(pipe.unet.forward.graphs) == 2
    pipe.disable_fast_path()
    assert "forward" not in pipe.unet.__dict__
