"""Every attention backend on the GPU against a float64 reference, on the SD 1.x shapes (batch cut
down) and edge shapes; skipped without CUDA. Run with -s to see which backend `auto` picks per shape."""
import pytest
import torch

from diffusers.models import attention_dispatch as ad

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (name, batch, heads, query length, key length, head dim): SD 1.x at 512x512, batch 2 (one image + CFG)
SD_SHAPES = [
    ("unet self 64x64", 2, 8, 4096, 4096, 40),
    ("unet cross 64x64", 2, 8, 4096, 77, 40),
    ("unet self 32x32", 2, 8, 1024, 1024, 80),
    ("unet cross 32x32", 2, 8, 1024, 77, 80),
    ("unet self 16x16", 2, 8, 256, 256, 160),
    ("unet cross 16x16", 2, 8, 256, 77, 160),
    ("unet self 8x8 (mid)", 2, 8, 64, 64, 160),
    ("vae mid 64x64", 1, 1, 4096, 4096, 512),
]
ODD = [("odd 24", 2, 3, 300, 300, 24), ("odd 72", 2, 3, 300, 77, 72), ("odd 200", 2, 2, 300, 300, 200),
       ("odd 320", 1, 2, 300, 300, 320)]
DTYPES = [torch.float16, torch.bfloat16]


def reference(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def inputs(b, h, sq, sk, d, dtype):
    # (B, S, H, D) memory viewed as (B, H, S, D), as the attention modules hand it over
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, sk, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, sk, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SD_SHAPES + ODD, ids=[s[0] for s in SD_SHAPES + ODD])
def test_every_backend_matches_float64(shape, dtype):
    name, b, h, sq, sk, d = shape
    q, k, v = inputs(b, h, sq, sk, d, dtype)
    scale = d**-0.5
    ref = reference(q, k, v, scale)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # bf16 keeps 8 bits of mantissa
    served = []
    for backend in ["auto"] + list(ad.BACKENDS):
        try:
            out = ad.attention(q, k, v, scale, backend=backend)
        except ad.AttentionBackendError as e:
            assert backend != "auto", e
            assert "cannot serve" in str(e)
            continue
        err = (out.double() - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), f"{name} {backend}: max error {err}"
        served.append(backend)
    print(f"\n{name} {dtype}: auto -> {ad.choose(q, k, v, scale=scale)}; served by {served}")
    assert "math" in served and "sdpa" in served


@pytest.mark.parametrize("backend", ["sdpa-efficient", "sdpa", "math", "auto"])
def test_fp32_on_gpu(backend):
    q, k, v = inputs(2, 8, 1024, 77, 40, torch.float32)
    out = ad.attention(q, k, v, 40**-0.5, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, 40**-0.5), rtol=1e-4, atol=1e-4)


def test_nan_propagates_as_math():
    q, k, v = inputs(2, 8, 256, 256, 40, torch.float16)
    q[0, 3, 17, 5] = float("nan")
    ref = torch.isnan(ad.attention(q, k, v, backend="math"))
    for backend in ad.BACKENDS:
        try:
            out = ad.attention(q, k, v, backend=backend)
        except ad.AttentionBackendError:
            continue
        assert torch.equal(torch.isnan(out), ref), backend


def test_batch_heads_over_65535():
    q, k, v = inputs(8200, 8, 16, 16, 40, torch.float16)  # 65,600 rows of batch x heads
    out = ad.attention(q, k, v)
    idx = torch.randint(0, 8200, (16,), device="cuda")
    torch.testing.assert_close(out[idx].double(), reference(q[idx], k[idx], v[idx], 40**-0.5), rtol=2e-3, atol=2e-3)


def test_sd1_pipeline_fp16_auto_equals_math():
    from diffusers import local_pipelines

    pipe = local_pipelines.stable_diffusion("sd1", seed=7).to("cuda")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.safety_checker):
        m.half()
    images = {}
    for name in ("math", "auto"):
        g = torch.Generator("cuda").manual_seed(1234)
        with ad.attention_backend(name):
            images[name] = pipe(["a castle on a hill"], num_inference_steps=6, generator=g, output_type="np").images
    assert images["math"].std() > 0
    diff = abs(images["auto"] - images["math"]).max()
    print(f"\nsd1 fp16 512x512, 6 steps: max pixel difference auto vs math = {diff * 255:.3f}/255")
    assert diff <= 2 / 255
