# diffusers-flash: SDXL, SD3 and Flux pipelines built locally with random weights (no Hub), tiny for the
# tests and at their published full size for the benchmark (bench/models.py).
"""Build today's pipelines without the Hub, for releases that have them (SDXL 0.19+, SD3 0.29+, Flux 0.30+).

``size="tiny"``: upstream's fast-test configurations (seconds on a CPU). ``size="full"``: the published
architectures (SDXL base 1.0; SD3 medium with CLIP-L, CLIP-G and T5-XXL; Flux.1-dev with CLIP-L and
T5-XXL), built directly on ``device`` in ``dtype`` from ``seed``: the same seed, torch and device give
the same weights in any process, so two sides of a benchmark compute on the same numbers without a
checkpoint on disk (Flux with T5-XXL is about 33 GB in bf16). Tokenizers are the offline byte-level
CLIP tokenizer of ``local_pipelines`` (T5's too: any ids below the vocabulary size serve for timing).
Images are noise-like: the weights are random.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

MODELS = ("sdxl", "sd3", "flux")

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, vocab_size=49408)
CLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32, vocab_size=1000)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
T5_TINY = dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, is_encoder_decoder=False)
VAE_FULL = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                sample_size=1024)
VAE_TINY = dict(block_out_channels=(4,), in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=1,
                sample_size=32, use_quant_conv=False, use_post_quant_conv=False)

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "full": dict(
            unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
            vae=dict(VAE_FULL, latent_channels=4, scaling_factor=0.13025, force_upcast=True),
            text=CLIP_L, text_2=CLIP_G, image_size=1024),
        "tiny": dict(
            unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                      cross_attention_dim=64),
            vae=dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                     latent_channels=4, sample_size=128, force_upcast=False),
            text=CLIP_TINY, text_2=CLIP_TINY, image_size=64),
    },
    "sd3": {
        "full": dict(
            transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
            vae=dict(VAE_FULL, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False),
            text=CLIP_L, text_2=CLIP_G, t5=T5_XXL, image_size=1024),
        "tiny": dict(
            transformer=dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                             pooled_projection_dim=64, out_channels=4),
            vae=dict(VAE_TINY, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
            text=CLIP_TINY, text_2=CLIP_TINY, t5=T5_TINY, image_size=32),
    },
    "flux": {
        "full": dict(
            transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
            vae=dict(VAE_FULL, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False),
            text=CLIP_L, t5=T5_XXL, image_size=1024),
        "tiny": dict(
            transformer=dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8)),
            vae=dict(VAE_TINY, latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035),
            text=CLIP_TINY, t5=T5_TINY, image_size=32),
    },
}


@contextlib.contextmanager
def _building(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters made directly on ``device`` in ``dtype`` (no float32 copy on the host first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _pipeline_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise NotImplementedError(f"diffusers {diffusers.__version__} has no {name}")
    return cls


def _clip(cfg: dict, tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5,
                            **dict(cfg, vocab_size=max(cfg["vocab_size"], len(tokenizer))))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(cfg: dict) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**cfg)).eval()


# where make_tokenizer comes from: diffusers.flash.local_pipelines, or that file loaded by path where the
# installed diffusers is pristine upstream (the benchmark's other side sets it)
TOKENIZER_SOURCE: Any = None


def _tokenizer(max_length: int) -> Any:
    source = TOKENIZER_SOURCE
    if source is None:
        from diffusers.flash import local_pipelines as source

    tokenizer = source.make_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def pipeline(model: str, size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> Any:
    """``model`` ("sdxl", "sd3" or "flux") at ``size`` ("tiny" or "full") with random weights from ``seed``,
    its parts made on ``device`` in ``dtype``. Raises NotImplementedError where this release lacks it."""
    if model not in CONFIGS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    cfg = CONFIGS[model][size]
    names = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
    cls = _pipeline_class(names[model])
    import diffusers

    tokenizer = _tokenizer(77)
    parts: dict[str, Any] = {}
    with _building(device, dtype):
        torch.manual_seed(seed)
        if model == "sdxl":
            parts["unet"] = diffusers.UNet2DConditionModel(**cfg["unet"])
        elif model == "sd3":
            parts["transformer"] = diffusers.SD3Transformer2DModel(**cfg["transformer"])
        else:
            parts["transformer"] = diffusers.FluxTransformer2DModel(**cfg["transformer"])
        torch.manual_seed(seed + 1)
        parts["vae"] = diffusers.AutoencoderKL(**cfg["vae"])
        torch.manual_seed(seed + 2)
        parts["text_encoder"] = _clip(cfg["text"], tokenizer, projection=model == "sd3")
        parts["tokenizer"] = tokenizer
        if "text_2" in cfg:
            torch.manual_seed(seed + 3)
            parts["text_encoder_2"] = _clip(cfg["text_2"], tokenizer, projection=True)
            parts["tokenizer_2"] = tokenizer
        if "t5" in cfg:
            torch.manual_seed(seed + 4)
            t5, t5_tokenizer = _t5(cfg["t5"]), _tokenizer(512)
            key = "3" if model == "sd3" else "2"
            parts[f"text_encoder_{key}"], parts[f"tokenizer_{key}"] = t5, t5_tokenizer
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if model == "sdxl":
        parts["scheduler"] = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading")
    elif model == "sd3":
        parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True)
    return cls(**parts)


def image_size(model: str, size: str = "tiny") -> int:
    """The side in pixels the benchmark and the tests ask ``model`` at ``size`` for."""
    return CONFIGS[model][size]["image_size"]
