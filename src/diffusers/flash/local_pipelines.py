# diffusers-flash: Stable Diffusion pipelines built locally, with random weights, for machines that
# cannot download checkpoints (CI, air-gapped GPUs): the README's default job, the tests, the benchmark.
"""Build a Stable Diffusion pipeline without the Hub.

``size="tiny"`` is the small configuration of upstream's own fast tests (runs in seconds on a CPU);
``size="sd1"`` is the full Stable Diffusion v1.x architecture (UNet 860M, VAE 84M, CLIP text 123M),
whose timings equal real weights'. Every part is the real class: UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer (a byte-level vocabulary written locally),
StableDiffusionSafetyChecker and CLIPImageProcessor, so ``save_pretrained``/``from_pretrained``
and the pipelines run their real code. Images are noise-like: the weights are random.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from diffusers.pipelines import StableDiffusionPipeline

CONFIGS = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
        # four blocks, so that latents are 1/8 of the image's side as in Stable Diffusion: the pipeline's
        # height and width are the image's (0.4.x's pipeline takes the factor 8 as given)
        vae=dict(block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 latent_channels=4),
        text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                  max_position_embeddings=77),
        vision=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    image_size=32, patch_size=8),
        # image_size: the side of the images generate.py makes by default (latents 8x8)
        projection_dim=32, image_size=64,
    ),
    "sd1": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                  out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, layers_per_block=2,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 latent_channels=4, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77, hidden_act="quick_gelu"),
        vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                    image_size=224, patch_size=32),
        projection_dim=768, image_size=512,
    ),
}


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer(directory: str | None = None) -> "CLIPTokenizer":
    """A CLIPTokenizer over a byte-level vocabulary (each byte, each byte ending a word, specials).
    Unknown to the Hub, so it works offline; any text encodes (to one token per byte).

    Its vocab.json and merges.txt are written into ``directory`` and kept there; without one, into a
    temporary folder that is removed again once the tokenizer has read them (it keeps them in memory,
    and ``save_pretrained`` writes them from there), so building pipelines leaves nothing behind."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="diffusers-flash-tokenizer-") as tmp:
            return make_tokenizer(tmp)
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


def components(size: str = "tiny", seed: int = 0, scheduler: str = "pndm") -> dict:
    """The pipeline's parts with random weights drawn from ``seed`` (same seed, same weights)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    from diffusers.models import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from diffusers.schedulers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler
    from diffusers.flash.compat.transformers import clip_image_processor

    if size not in CONFIGS:
        raise ValueError(f"size must be one of {sorted(CONFIGS)}, not {size!r}")
    cfg = CONFIGS[size]
    tokenizer = make_tokenizer()
    vocab = max(len(tokenizer), 1000 if size == "tiny" else 49408)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 layer_norm_eps=1e-5, **cfg["text"])
    text_encoder = CLIPTextModel(text_config).eval()
    torch.manual_seed(seed + 3)
    safety_config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=1, vocab_size=vocab,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id),
                               vision_config=cfg["vision"], projection_dim=cfg["projection_dim"])
    safety_checker = StableDiffusionSafetyChecker(safety_config).eval()
    px = cfg["vision"]["image_size"]
    feature_extractor = clip_image_processor()(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedulers = {
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, steps_offset=1, **betas),
        "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas),
        "lms": lambda: LMSDiscreteScheduler(**betas),
    }
    if scheduler not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, not {scheduler!r}")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=schedulers[scheduler](), safety_checker=safety_checker,
                feature_extractor=feature_extractor)


def vae_scale_factor(size: str = "tiny") -> int:
    """Pixels per latent along each side: 8 for both sizes (four VAE blocks), as in Stable Diffusion, so a
    pipeline called with ``height=h, width=w`` returns images of h x w pixels."""
    return 2 ** (len(CONFIGS[size]["vae"]["block_out_channels"]) - 1)


def default_image_size(size: str = "tiny") -> int:
    """Side in pixels of the images ``examples/generate.py`` makes by default with this model: 64 for ``tiny``,
    512 for ``sd1``. (Called without ``height``/``width``, the pipeline itself makes 512x512 on 0.4.x and
    ``unet.config.sample_size * vae_scale_factor`` on later releases.)"""
    return CONFIGS[size]["image_size"]


def stable_diffusion(size: str = "tiny", seed: int = 0, scheduler: str = "pndm",
                     pipeline_class: type | None = None) -> "StableDiffusionPipeline":
    """A StableDiffusionPipeline (or ``pipeline_class``: img2img, inpaint) built locally, with random weights
    drawn from ``seed``. Its images have the size asked for: ``pipe(prompt, height=64, width=64)`` gives
    64x64 (latents are 1/8 of each side; height and width must be multiples of 8)."""
    from diffusers.pipelines import StableDiffusionPipeline

    return (pipeline_class or StableDiffusionPipeline)(**components(size, seed, scheduler))


def stable_diffusion_xl(seed: int = 0, force_upcast: bool = True) -> Any:
    """A tiny StableDiffusionXLPipeline built locally (upstream's fast-test configuration: two CLIP text
    encoders, the UNet's ``text_time`` added conditioning, Euler), for releases that have SDXL (0.19 on).
    ``force_upcast``: the VAE config's flag that makes the pipeline decode in float32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import diffusers
    from diffusers.models import AutoencoderKL, UNet2DConditionModel

    pipeline_class = getattr(diffusers, "StableDiffusionXLPipeline", None)
    if pipeline_class is None:
        raise NotImplementedError(f"diffusers {diffusers.__version__} has no StableDiffusionXLPipeline (upstream "
                                  f"added SDXL in 0.19)")
    from diffusers.schedulers import EulerDiscreteScheduler

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128, force_upcast=force_upcast)
    text_config = CLIPTextConfig(vocab_size=max(len(tokenizer), 1000), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=32,
                                 **CONFIGS["tiny"]["text"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return pipeline_class(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                          tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
