"""Same seed, same image: every attention backend against upstream's math, for txt2img, img2img and
inpaint, on a tiny Stable Diffusion pipeline built locally (CPU fp32; GPU fp16 where CUDA is present).

In fp16 the bound is 1/255 beyond math's own rounding: no backend may be more than 1/255 further from the
image of math in fp32 than math in fp16 is. A plain 1/255 against fp16 math asks every kernel to repeat math's
rounding errors: on an H100 (2026-12-07) auto differed from fp16 math by 1.49/255 (img2img) and 2.37/255
(inpaint); run in fp16 on the CPU, math itself was 0.8-2.0/255 from fp32 math on img2img and inpaint, while
SDPA's error stayed within 0.25/255 of math's (and up to 2.7/255 from fp16 math's image)."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.flash import local_pipelines
from diffusers.flash.attention import dispatch as ad

CUDA = torch.cuda.is_available()
DEVICES = [("cpu", torch.float32, 1 / 255)] + ([("cuda", torch.float16, 1 / 255)] if CUDA else [])


def _images(seed, pipe):
    rng = np.random.default_rng(seed)
    init = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))  # tiny VAE (1/8): latents 16x16
    # the mask is resized to the 16x16 latents: by 8 up to 0.8, by the VAE's scale factor from 0.9
    side = 16 * getattr(pipe, "vae_scale_factor", 8)
    mask = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    return init, mask


def _run(pipe, task, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    args = dict(prompt=["a red bicycle", "an old lighthouse"], num_inference_steps=4, generator=g, output_type="np")
    if task == "txt2img":
        return pipe(height=128, width=128, **args).images
    init, mask = _images(seed, pipe)
    if task == "img2img":
        return pipe(**{_image_kwarg(pipe): init}, strength=0.75, **args).images
    return pipe(**{_image_kwarg(pipe): init}, mask_image=mask, strength=0.75, **args).images


PIPELINES = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
             # from 0.6.0 the 4-channel inpaint pipeline, with these arguments, is the Legacy one
             "inpaint": getattr(diffusers, "StableDiffusionInpaintPipelineLegacy", StableDiffusionInpaintPipeline)}


@pytest.mark.parametrize("device,dtype,tol", [pytest.param(*d, marks=pytest.mark.gpu if d[0] == "cuda" else ())
                                              for d in DEVICES], ids=[d[0] for d in DEVICES])
@pytest.mark.slow  # whole pipelines on the CPU: seconds each
@pytest.mark.parametrize("task", list(PIPELINES))
def test_backends_give_the_same_image_as_math(device, dtype, tol, task):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh every run; printed on failure
    pipe = local_pipelines.stable_diffusion("tiny", seed=seed % 1000, pipeline_class=PIPELINES[task])
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True) if hasattr(pipe, "set_progress_bar_config") else None
    with ad.attention_backend("math"):
        exact = _run(pipe, task, device, seed)  # fp32: the image fp16's rounding is measured from
        if dtype != torch.float32:
            for m in (pipe.unet, pipe.vae, pipe.text_encoder):
                m.to(dtype)
        ref = _run(pipe, task, device, seed)
    assert np.isfinite(ref).all() and ref.std() > 0
    bound = np.abs(ref - exact).max() + tol  # math's own rounding (0 in fp32), and 1/255 more
    names = ["auto"] + [n for n, ok, _ in ad.backend_status() if ok and n != "math"]
    for name in names:
        try:
            with ad.attention_backend(name):
                out = _run(pipe, task, device, seed)
        except ad.AttentionBackendError as e:  # a forced kernel that cannot serve a shape says why
            assert name != "auto", e
            continue
        diff, off = np.abs(out - ref).max(), np.abs(out - exact).max()
        print(f"{task} {device} {name}: max pixel difference to math {diff * 255:.3f}/255, to fp32 math "
              f"{off * 255:.3f}/255 (fp16 math {(bound - tol) * 255:.3f}/255)")  # shown with -s
        assert off <= bound, (f"{task} {name} seed={seed}: max pixel difference to fp32 math {off * 255:.2f}/255, "
                              f"fp16 math's {(bound - tol) * 255:.2f}/255")
        pipe.enable_attention_slicing(1)  # slicing (one batch x head row at a time) changes nothing either
        with ad.attention_backend(name):
            sliced = _run(pipe, task, device, seed)
        pipe.disable_attention_slicing()
        assert np.abs(sliced - out).max() <= tol, f"{task} {name} sliced seed={seed}"


def _image_kwarg(pipe) -> str:
    """The init image's keyword: ``init_image`` until 0.13 deprecated it for ``image`` (gone in 0.14)."""
    return "image" if "image" in inspect.signature(pipe.__call__).parameters else "init_image"
