"""The fast path for transformer denoisers (SD3, Flux) and the offline SDXL/SD3/Flux pipelines.

The pipelines exist from upstream 0.19 (SDXL), 0.29 (SD3) and 0.30 (Flux): at the pin these tests skip,
naming the missing class; after ``fork.py rebase 0.42.1`` (and in CI's run at 0.42.1) they run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
from diffusers.flash import local_sdxl_sd3_flux as local
from diffusers.flash.fastpath import denoiser, graphs
from diffusers.flash.fastpath import engine as fast_path

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _needs(model: str) -> None:
    if not hasattr(diffusers, PIPELINES[model]):
        pytest.skip(f"diffusers {diffusers.__version__} has no {PIPELINES[model]}")


def test_split_and_join_keywords_round_trip():
    device = torch.device("cpu")
    a, b, c = torch.zeros(2), torch.ones(3), torch.full((1,), 2.0)
    kwargs = {"hidden_states": a, "timestep": b, "extra": {"y": c}, "return_dict": False, "mask": None}
    layout, tensors = graphs.split_extra(kwargs, device, denoiser.STATIC)
    assert len(tensors) == 3
    back = graphs.join_extra(layout, tensors)
    assert back["hidden_states"] is a and back["timestep"] is b and back["extra"]["y"] is c
    assert back["return_dict"] is False and "mask" not in back
    # a value that cannot be a graph input or part of the layout: that call is not captured
    assert graphs.split_extra({"hidden_states": a, "skip_layers": [7]}, device, denoiser.STATIC) is None
    assert graphs.split_extra({"hidden_states": a, "scale": 0.5}, device, denoiser.STATIC) is None
    # a tensor on another device than the sample's is not an input either
    assert graphs.split_extra({"hidden_states": a, "t": torch.zeros(1, device="meta")}, device,
                              denoiser.STATIC) is None


def test_graphed_denoiser_leaves_cpu_calls_to_the_model():
    seen = []

    def forward(*args, **kwargs):
        seen.append((args, kwargs))
        return ("out",)

    wrapper = denoiser.GraphedDenoiser(forward)
    x = torch.zeros(1, 4)
    assert wrapper(hidden_states=x, timestep=torch.ones(1), return_dict=False) == ("out",)
    assert seen and seen[0][1]["hidden_states"] is x and not wrapper.calls


@pytest.mark.parametrize("kind", ["clip", "clip-projection", "t5"])
@pytest.mark.parametrize("hidden", [None, False, True])
def test_text_encoder_output_round_trips_through_flat_tensors(kind, hidden):
    """What a graphed text encoder hands back is its own output class with the same fields (SDXL and SD3 read
    ``hidden_states[-2]`` and ``text_embeds``, Flux ``pooler_output``), built from the flat tensors a graph
    returns."""
    tokenizer = local._tokenizer(77)
    model = {"clip": lambda: local._clip(local.CLIP_TINY, tokenizer, False),
             "clip-projection": lambda: local._clip(local.CLIP_TINY, tokenizer, True),
             "t5": lambda: local._t5(local.T5_TINY)}[kind]()
    ids = torch.randint(0, 99, (2, 77))
    with torch.no_grad():
        out = model(ids) if hidden is None else model(ids, output_hidden_states=hidden)
    spec, tensors = graphs.flatten_output(out)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    copies = tuple(t.clone() + 1 for t in tensors)  # a graph's outputs are other tensors than the model's
    back = graphs.unflatten_output(spec, copies)
    assert type(back) is type(out) and list(back.keys()) == list(out.keys())
    for key in out.keys():
        a, b = out[key], back[key]
        pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
        for x, y in pairs:
            torch.testing.assert_close(y, x + 1)
    assert (back.hidden_states is not None) == bool(hidden)
    plain = graphs.unflatten_output(graphs.flatten_output(tuple(out.values()))[0], tensors)
    assert type(plain) is tuple and len(plain) == len(out)
    with pytest.raises(TypeError, match="'bad'"):
        graphs.flatten_output({"bad": "text"})


def test_graphed_text_encoder_leaves_other_calls_to_the_model():
    """CPU ids, masks and grad reach the encoder's own forward with every argument as given."""
    seen = []

    def forward(ids, *args, **kwargs):
        seen.append(kwargs)
        return ("out",)

    wrapper = graphs.GraphedTextForward(forward, name="text encoder 3")
    ids = torch.zeros(1, 77, dtype=torch.long)
    assert wrapper(ids, output_hidden_states=True) == ("out",)
    assert wrapper(ids, attention_mask=ids) == ("out",)
    assert seen == [{"output_hidden_states": True}, {"attention_mask": ids}]
    assert wrapper.graphs == {} and wrapper.graphed.name == "text encoder 3"


@pytest.mark.parametrize("model", sorted(PIPELINES))
def test_tiny_pipeline_gives_the_size_asked_for(model):
    _needs(model)
    pipe = local.pipeline(model, "tiny")
    pipe.set_progress_bar_config(disable=True)
    side = local.image_size(model)
    out = pipe("a cat", num_inference_steps=2, height=side, width=side, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, side, side, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_enable_on_the_cpu_says_why_and_changes_nothing(model):
    _needs(model)
    if torch.cuda.is_available():
        pytest.skip("this checks the report where there is no CUDA device")
    pipe = local.pipeline(model, "tiny")
    report = fast_path.enable(pipe)
    assert report["cuda_graphs"] == [] and any("no CUDA" in why for why in report["reasons"])
    assert "forward" not in pipe.transformer.__dict__ and not fast_path.is_enabled(pipe)


def _images(pipe, side, seed=0):
    return pipe("a cat", num_inference_steps=3, height=side, width=side, output_type="np",
                generator=torch.Generator("cuda").manual_seed(seed)).images


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled"])
@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_transformer_fast_path_gives_the_same_images_and_replays(model, compile):
    _needs(model)
    from diffusers.flash.attention.dispatch import attention_backend

    dtype = torch.float16
    pipe = local.pipeline(model, "tiny", device="cuda", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    side = local.image_size(model)
    with attention_backend("math"):
        reference = _images(pipe, side)
    report = pipe.enable_fast_path(compile=compile)
    assert "transformer" in report["cuda_graphs"], report
    encoders = {"sd3": ["text encoder", "text encoder 2", "text encoder 3"],
                "flux": ["text encoder", "text encoder 2"]}[model]  # CLIP (with projection in SD3), T5
    assert [w for w in report["cuda_graphs"] if w.startswith("text")] == encoders, report
    first = _images(pipe, side)
    wrappers = [pipe.transformer.__dict__["forward"]] + [
        getattr(pipe, w.replace("text encoder", "text_encoder").replace(" ", "_")).__dict__["forward"]
        for w in encoders]
    captured = [dict(w.graphs) for w in wrappers]
    assert all(captured), f"not captured: {[w for w, c in zip(['transformer'] + encoders, captured) if not c]}"
    assert all(c.failed is None for w in wrappers for c in w.calls.values())
    second = _images(pipe, side)
    assert [dict(w.graphs) for w in wrappers] == captured, "the second call captured again instead of replaying"
    np.testing.assert_array_equal(first, second)
    diff = np.abs((first * 255).round() - (reference * 255).round()).max()
    print(f"{model} compile={compile}: largest difference against math {diff}/255")
    assert diff <= 1, f"{diff}/255"
    pipe.disable_fast_path()
    assert "forward" not in pipe.transformer.__dict__
