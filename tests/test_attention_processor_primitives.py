"""flash/attention/processor_primitives.py: the drop-ins that upstream's attention processors (0.12+) call.
Each must give upstream's numbers, go through our dispatcher (a backend named for the module is obeyed, and
one that cannot serve the call refuses it), and refuse, with the reason, a mask under a backend that cannot
take one."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers.flash.attention import dispatch
from diffusers.flash.attention import processor_primitives as hooks
from diffusers.flash.attention.dispatch import AttentionBackendError, attention_backend


class Attn(torch.nn.Module):
    """The parts of upstream's CrossAttention/Attention the processors' primitives read."""

    def __init__(self, heads=2, dim_head=8, upcast=False):
        super().__init__()
        self.heads, self.scale, self.upcast_attention, self.upcast_softmax = heads, dim_head ** -0.5, upcast, upcast

    def get_attention_scores(self, query, key, attention_mask=None):  # upstream's computation, in the test
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            baddbmm_input, beta = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype), 0
        else:
            baddbmm_input, beta = attention_mask, 1
        scores = torch.baddbmm(baddbmm_input, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)


def reference(q, k, v, scale, mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    return (s.softmax(-1) @ v.double()).float()


@pytest.fixture(autouse=True)
def fresh_backend():
    dispatch.set_attention_backend(None)
    yield
    dispatch.set_attention_backend(None)


def bhsd(b=2, h=2, s=6, d=8, sk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, h, sk or s, d, generator=g),
            torch.randn(b, h, sk or s, d, generator=g))


def test_sdpa_gives_torchs_numbers_and_obeys_the_backend_named_for_the_module():
    q, k, v = bhsd(sk=9)
    module = Attn()
    torch.testing.assert_close(hooks.sdpa(q, k, v, module=module), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(hooks.sdpa(q, k, v, scale=0.3), reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    module._attention_backend = "sdpa-flash"  # cannot run on the CPU: the refusal proves the call went through us
    with pytest.raises(AttentionBackendError, match="sdpa-flash.*device cpu"):
        hooks.sdpa(q, k, v, module=module)
    with attention_backend("math"):  # the context wins over the module's choice, as everywhere
        torch.testing.assert_close(hooks.sdpa(q, k, v, module=module), reference(q, k, v, 8 ** -0.5), atol=1e-5,
                                   rtol=1e-5)


def test_sdpa_with_a_mask_runs_as_upstream_under_auto_and_is_refused_by_a_named_kernel():
    q, k, v = bhsd(sk=7)
    mask = torch.zeros(2, 1, 6, 7)
    mask[..., -2:] = -math.inf
    torch.testing.assert_close(hooks.sdpa(q, k, v, attn_mask=mask), reference(q, k, v, 8 ** -0.5, mask), atol=1e-5,
                               rtol=1e-5)
    causal = hooks.sdpa(q, k, k, is_causal=True)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, k, is_causal=True))
    module = Attn()
    module._attention_backend = "sdpa"
    with pytest.raises(AttentionBackendError, match="'sdpa' cannot serve this call: it has an attention mask"):
        hooks.sdpa(q, k, v, attn_mask=mask, module=module)


@pytest.mark.parametrize("upcast", [False, True])
def test_bmm_attention_equals_upstreams_scores_then_bmm(upcast):
    attn = Attn(heads=2, upcast=upcast)
    q, k, v = (t.flatten(0, 1) for t in bhsd(sk=77))  # (batch x heads, seq, d), as head_to_batch_dim
    expected = torch.bmm(attn.get_attention_scores(q, k), v)
    torch.testing.assert_close(hooks.bmm_attention(attn, q, k, v), expected, atol=1e-5, rtol=1e-5)
    # upstream's sliced processor hands over 3 of the 4 rows at a time: not whole batch entries
    torch.testing.assert_close(hooks.bmm_attention(attn, q[:3], k[:3], v[:3]), expected[:3], atol=1e-5, rtol=1e-5)


def test_bmm_attention_in_half_precision_keeps_upstreams_upcast():
    attn = Attn(heads=2, upcast=True)
    q, k, v = (t.flatten(0, 1).to(torch.bfloat16) * 30 for t in bhsd())
    attn._attention_backend = "math"
    out = hooks.bmm_attention(attn, q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q.float(), k.float(), v.float(), attn.scale), atol=0.3,
                               rtol=2e-2)


def test_bmm_attention_with_a_mask_is_upstreams_and_a_named_kernel_refuses_it():
    attn = Attn()
    q, k, v = (t.flatten(0, 1) for t in bhsd(sk=5))
    mask = torch.zeros(4, 1, 5)
    mask[..., 0] = -10000.0
    torch.testing.assert_close(hooks.bmm_attention(attn, q, k, v, mask),
                               torch.bmm(attn.get_attention_scores(q, k, mask), v))
    attn._attention_backend = "sdpa-cudnn"
    with pytest.raises(AttentionBackendError, match="attention mask"):
        hooks.bmm_attention(attn, q, k, v, mask)


def test_xformers_attention_runs_on_memory_efficient_attention_unless_a_backend_is_named():
    attn = Attn()
    q, k, v = (t.flatten(0, 1) for t in bhsd(sk=9))
    with pytest.raises(AttentionBackendError, match="sdpa-efficient.*device cpu"):  # xformers' kernel is CUDA-only
        hooks.xformers_attention(q, k, v, scale=attn.scale, module=attn)
    attn._attention_backend = "math"
    expected = reference(q, k, v, attn.scale)
    torch.testing.assert_close(hooks.xformers_attention(q, k, v, scale=attn.scale, module=attn), expected,
                               atol=1e-5, rtol=1e-5)
    mask = torch.zeros(4, 6, 9)
    mask[..., :2] = -10000.0
    torch.testing.assert_close(hooks.xformers_attention(q, k, v, attn_bias=mask, scale=attn.scale, module=attn),
                               reference(q, k, v, attn.scale, mask), atol=1e-5, rtol=1e-5)
