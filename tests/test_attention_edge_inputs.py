"""The dispatcher's `auto` on the CPU against `math` and a float64 reference on inputs at the edges: a
non-finite scale, half-precision scores that overflow, head dim 0, and a long call holding one inf (whose
memory must stay that of the fused kernel, not of a full score matrix). On every release: these tests call
the dispatcher directly."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from diffusers.flash.attention import dispatch as ad  # noqa: E402


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(ad.ENV_VAR, raising=False)
    ad.set_attention_backend(None)
    ad._cache.clear()
    yield
    ad._cache.clear()


def reference(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_auto_propagates_a_non_finite_scale_as_math(scale):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    want = torch.isnan(ad.attention(q, k, v, scale, backend="math"))
    assert want.all()  # every score is scaled: every row is poisoned
    got = ad.attention(q, k, v, scale, backend="auto")
    assert torch.equal(torch.isnan(got), want)


def test_auto_gives_the_reference_where_math_overflows_in_half_precision():
    """auto_order's docstring: on finite inputs whose q.k overflows float16, `math` (upstream's computation,
    scores in the input dtype) gives NaN; `auto` (the fused kernel, float32 accumulation) the reference's
    finite answer. The two agree on where NaN is only for inputs holding inf or NaN."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 64, generator=gen) for _ in range(3))
    q, k, v = (q * 60).half(), (k * 60).half(), v.half()
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    ref = reference(q, k, v, 64**-0.5)
    assert torch.isfinite(ref).all()
    assert torch.isnan(ad.attention(q, k, v, backend="math")).any()
    auto = ad.attention(q, k, v, backend="auto")
    torch.testing.assert_close(auto.double(), ref, rtol=2e-3, atol=2e-3)
    doc = " ".join(ad.auto_order.__doc__.split())
    assert "overflow" in doc and "agree on every input" not in doc


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
@pytest.mark.parametrize("scale", [None, 1.0], ids=["default-scale", "explicit-scale"])
def test_head_dim_zero_gives_an_empty_output(backend, scale):
    q, k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0), torch.randn(2, 3, 7, 0)
    out = ad.attention(q, k, v, scale, backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert out.shape == want.shape == (2, 3, 5, 0) and out.dtype == q.dtype


def test_a_long_cpu_call_with_an_inf_goes_to_math_in_bounded_pieces(monkeypatch):
    """`auto` sends a CPU call holding an inf to `math` (the fused kernel hides NaN there); `math` then builds
    the score matrix a piece of query rows at a time, each under the budget, with math's result."""
    q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
    k[0, 1, 17, 3] = float("inf")
    q[0, 0, 250, 0] = float("nan")
    whole = ad.attention(q, k, v, 0.3, backend="math")
    budget = 2 * 40 * 300 * 4 * 2  # 40 query rows of scores and probabilities for 2 heads
    monkeypatch.setattr(ad, "CPU_FALLBACK_SCORES_BUDGET", budget)
    seen = []
    real = ad.BACKENDS["math"].run

    def spy(c):
        seen.append(c.q.shape[0] * c.q.shape[1] * c.q.shape[2] * c.k.shape[2] * c.q.element_size() * 2)
        return real(c)

    monkeypatch.setattr(ad.BACKENDS["math"], "run", spy)
    ad._cache.clear()
    got = ad.attention(q, k, v, 0.3, backend="auto")
    assert seen and max(seen) <= budget and len(seen) > 1, seen
    assert torch.equal(torch.isnan(got), torch.isnan(whole))
    finite = torch.isfinite(whole)
    torch.testing.assert_close(got[finite], whole[finite])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_a_long_cpu_call_with_an_inf_needs_no_full_score_matrix():
    """The real memory of one such call (8192 tokens: a full float32 score matrix and its softmax are 512 MiB)
    stays within the budget and the output, in a fresh process whose peak resident size is reset first."""
    code = textwrap.dedent("""
        import torch
        from diffusers.flash.attention import dispatch as ad
        torch.set_num_threads(1)
        q, k, v = (torch.randn(1, 1, 8192, 16) for _ in range(3))
        k[0, 0, 100, 3] = float("inf")
        ad.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="auto")  # warm up the allocator
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size to the current one
        before = status("VmRSS:")
        out = ad.attention(q, k, v, backend="auto")
        assert torch.isnan(out).any()
        print(status("VmHWM:") - before)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode and "clear_refs" in done.stderr:
        pytest.skip(f"cannot reset the peak resident size here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    grew = int(done.stdout.split()[-1])
    assert grew < 200 << 20, f"peak grew by {grew / 2**20:.0f} MiB (a full score matrix and its softmax: 512)"
