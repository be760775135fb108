"""Patch 0008: a list of negative prompts, one per prompt, in a batch of several prompts (upstream 0.4.2
repeats them batch_size times and fails), for txt2img, img2img and inpaint (on 0.6.0 and later the 4-channel
inpaint pipeline these tiny models fit is StableDiffusionInpaintPipelineLegacy, with 0.4.2's arguments)."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.flash import local_pipelines

PIPELINES = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
             "inpaint": getattr(diffusers, "StableDiffusionInpaintPipelineLegacy", StableDiffusionInpaintPipeline)}


def run(pipe, task, negative_prompt):
    rng = np.random.default_rng(0)
    args = dict(prompt=["a red bicycle", "an old lighthouse"], negative_prompt=negative_prompt,
                num_images_per_prompt=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np")
    if task == "txt2img":
        return pipe(height=64, width=64, **args).images
    init = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))  # tiny VAE (1/8): latents 16x16
    if "init_image" not in inspect.signature(pipe.__call__).parameters:  # renamed image in 0.10
        args["image"] = init
        init = None
    else:
        args["init_image"] = init
    if task == "img2img":
        return pipe(strength=0.75, **args).images
    # the mask is resized to the 16x16 latents: by 8 up to 0.8, by the VAE's scale factor from 0.9
    side = 16 * getattr(pipe, "vae_scale_factor", 8)
    mask = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    return pipe(mask_image=mask, strength=0.75, **args).images


@pytest.mark.parametrize("task", list(PIPELINES))
def test_each_prompt_gets_its_own_negative_prompt(task):
    pipe = local_pipelines.stable_diffusion("tiny", pipeline_class=PIPELINES[task])
    pipe.set_progress_bar_config(disable=True)
    both = run(pipe, task, ["blurry", "fog"])
    second_only = run(pipe, task, ["", "fog"])
    assert both.shape[0] == 4  # 2 prompts x 2 images, ordered prompt by prompt
    assert np.abs(both[2:] - second_only[2:]).max() < 1e-5  # the second prompt's images: same negative
    assert np.abs(both[:2] - second_only[:2]).max() > 1e-3  # the first prompt's: "blurry" vs none

