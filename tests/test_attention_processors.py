"""From 0.12 upstream computes attention in processor classes (models/cross_attention.py); patch 0004 replaces
the attention primitive inside each of them with a drop-in of flash/attention/processor_primitives.py. These
tests build a small UNet2DConditionModel and AutoencoderKL at the laid-down release and check that every
attention call reaches our dispatcher, with upstream's default processor and with each processor class upstream
ships set through upstream's own switches (set_attn_processor, set_processor, set_attention_slice, the xformers one)."""
import importlib
import inspect

import pytest
import torch

from diffusers.flash.attention import dispatch
from diffusers.flash.attention import processor_primitives as hooks
from diffusers.flash.attention.dispatch import AttentionBackendError, attention_backend

try:
    ca = importlib.import_module("diffusers.models.cross_attention")
except ImportError:
    pytest.skip("upstream computes attention in processor classes from 0.12; on this release CrossAttention "
                "itself calls the dispatcher (tests/test_attention_dispatch.py)", allow_module_level=True)

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

QUERY, CROSS = 16, 8  # a standalone CrossAttention: query dim, text dim


def small_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(block_out_channels=(16, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, norm_num_groups=4, cross_attention_dim=CROSS, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def small_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def run_unet(unet):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 10,
                    encoder_hidden_states=torch.randn(1, 3, CROSS, generator=g)).sample


def run_vae(vae):
    with torch.no_grad():
        return vae(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))).sample


@pytest.fixture
def calls(monkeypatch):
    """Every call of dispatch.attention (hooks and AttentionBlock's path call it through the module)."""
    seen = []
    real = dispatch.attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(tuple(q.shape))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dispatch, "attention", spy)
    return seen


@pytest.fixture(autouse=True)
def fresh_backend():
    dispatch.set_attention_backend(None)
    yield
    dispatch.set_attention_backend(None)


def attention_modules(model):
    from diffusers.models.attention import AttentionBlock

    return [m for m in model.modules() if isinstance(m, (ca.CrossAttention, AttentionBlock))]


def test_every_attention_call_of_unet_and_vae_reaches_the_dispatcher(calls):
    unet, vae = small_unet(), small_vae()
    n_unet, n_vae = len(attention_modules(unet)), len(attention_modules(vae))
    assert n_unet >= 6 and n_vae >= 2  # down, mid, up: self and cross; encoder and decoder mid blocks
    run_unet(unet)
    assert len(calls) == n_unet  # one call per module, whichever processor upstream picked by default
    run_vae(vae)
    assert len(calls) == n_unet + n_vae


@pytest.mark.parametrize("build,run", [(small_unet, run_unet), (small_vae, run_vae)], ids=["unet", "vae"])
def test_a_backend_named_for_the_model_is_obeyed(build, run):
    model = build()
    reference = run(model)
    model.set_attention_backend("sdpa-flash")  # cannot serve on the CPU: the refusal proves the call came to us
    with pytest.raises(AttentionBackendError, match="sdpa-flash"):
        run(model)
    model.set_attention_backend("math")
    torch.testing.assert_close(run(model), reference, atol=1e-5, rtol=1e-4)


def standalone(added_kv: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if added_kv:  # UnCLIP's: the text's keys/values projected and put before the image's
        return ca.CrossAttention(QUERY, cross_attention_dim=QUERY, heads=2, dim_head=8, added_kv_proj_dim=CROSS,
                                 norm_num_groups=4).eval()
    return ca.CrossAttention(QUERY, cross_attention_dim=CROSS, heads=2, dim_head=8).eval()


def call(attn, added_kv: bool = False):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if added_kv:
            return attn(torch.randn(2, QUERY, 2, 3, generator=g), torch.randn(2, CROSS, 5, generator=g))
        return attn(torch.randn(2, 6, QUERY, generator=g), torch.randn(2, 5, CROSS, generator=g))


# each processor class upstream ships (0.12-0.14), built for the standalone module; True: needs added k/v
PROCESSORS = {
    "CrossAttnProcessor": (lambda: ca.CrossAttnProcessor(), False),
    "AttnProcessor2_0": (lambda: ca.AttnProcessor2_0(), False),
    "SlicedAttnProcessor": (lambda: ca.SlicedAttnProcessor(slice_size=1), False),
    "XFormersCrossAttnProcessor": (lambda: ca.XFormersCrossAttnProcessor(), False),
    "LoRACrossAttnProcessor": (lambda: ca.LoRACrossAttnProcessor(2 * 8, CROSS), False),
    "LoRAXFormersCrossAttnProcessor": (lambda: ca.LoRAXFormersCrossAttnProcessor(2 * 8, CROSS), False),
    "CrossAttnAddedKVProcessor": (lambda: ca.CrossAttnAddedKVProcessor(), True),
    "SlicedAttnAddedKVProcessor": (lambda: ca.SlicedAttnAddedKVProcessor(slice_size=1), True),
}


def test_every_processor_class_upstream_ships_is_covered_here():
    shipped = {name for name, obj in vars(ca).items() if isinstance(obj, type) and name.endswith(("Processor",
                                                                                                   "Processor2_0"))}
    assert "CrossAttnProcessor" in shipped
    assert shipped <= set(PROCESSORS), f"new upstream processors not tested: {sorted(shipped - set(PROCESSORS))}"
    assert all(hooks.routed(getattr(ca, name)()) for name in shipped & {"CrossAttnProcessor", "AttnProcessor2_0"})


def upstream_numbers(attn, added_kv, monkeypatch):
    """The module's output as upstream computes it: its plain processor with upstream's own primitive
    (get_attention_scores, then torch.bmm) in place of our drop-in."""
    with monkeypatch.context() as m:
        m.setattr(hooks, "bmm_attention",
                  lambda a, q, k, v, mask=None: torch.bmm(a.get_attention_scores(q, k, mask), v))
        attn.set_processor(ca.CrossAttnAddedKVProcessor() if added_kv else ca.CrossAttnProcessor())
        return call(attn, added_kv)


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_each_upstream_processor_set_on_a_module_reaches_the_dispatcher(name, calls, monkeypatch):
    if not hasattr(ca, name):
        pytest.skip(f"upstream {ca.__name__} has no {name} in this release")
    build, added_kv = PROCESSORS[name]
    attn = standalone(added_kv)
    reference = upstream_numbers(attn, added_kv, monkeypatch)
    attn.set_processor(build())
    calls.clear()
    if name == "LoRAXFormersCrossAttnProcessor" and "batch_to_head_dim" not in inspect.getsource(
            ca.LoRAXFormersCrossAttnProcessor.__call__):
        # upstream 0.12's defect (fixed in 0.13): it feeds (batch x heads) rows to to_out; our call came first
        with attention_backend("math"), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            call(attn, added_kv)
        assert len(calls) == 1
        return
    with attention_backend("math"):
        out = call(attn, added_kv)
    assert calls, f"{name}: no call reached the dispatcher"
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)  # LoRA's up-projections start at zero
    attn._attention_backend = "sdpa-flash"  # named for the module, cannot serve on the CPU: refused
    with pytest.raises(AttentionBackendError, match="sdpa-flash"):
        call(attn, added_kv)


def test_set_attn_processor_on_the_unet_reaches_the_dispatcher(calls):
    unet = small_unet()
    if not hasattr(unet, "set_attn_processor"):
        pytest.skip("UNet2DConditionModel.set_attn_processor is not in this release")
    reference = run_unet(unet)
    unet.set_attn_processor(ca.CrossAttnProcessor())
    calls.clear()
    torch.testing.assert_close(run_unet(unet), reference, atol=1e-5, rtol=1e-4)
    assert len(calls) == len(attention_modules(unet))


def test_attention_slicing_goes_through_the_dispatcher_slice_by_slice(calls):
    unet = small_unet()
    reference = run_unet(unet)
    unet.set_attention_slice(1)  # upstream's SlicedAttnProcessor: one (batch x head) row per call
    assert {type(m.processor).__name__ for m in unet.modules() if isinstance(m, ca.CrossAttention)} == {
        "SlicedAttnProcessor"}
    calls.clear()
    torch.testing.assert_close(run_unet(unet), reference, atol=1e-5, rtol=1e-4)
    assert len(calls) > len(attention_modules(unet)) and all(shape[0] * shape[1] == 1 for shape in calls)


def test_upstream_xformers_switch_goes_to_our_memory_efficient_backend_or_says_why():
    unet = small_unet()
    try:
        unet.enable_xformers_memory_efficient_attention()
    except ModuleNotFoundError as e:  # xformers not installed: upstream's switch refuses in one line, saying so
        assert "xformers" in str(e) and "\n" not in str(e).strip()
    except ValueError as e:  # installed, but no CUDA here: upstream's check says so
        assert "cuda" in str(e).lower()
    else:
        procs = {type(m.processor).__name__ for m in unet.modules() if isinstance(m, ca.CrossAttention)}
        assert procs == {"XFormersCrossAttnProcessor"}
    # whatever is installed: upstream's xformers processor sends its call to our sdpa-efficient (refused on
    # the CPU, with its reason), and xformers itself is never called
    attn = standalone()
    attn.set_processor(ca.XFormersCrossAttnProcessor())
    with pytest.raises(AttentionBackendError, match="sdpa-efficient"):
        call(attn)


def test_a_processor_of_the_users_own_is_named_once(monkeypatch):
    warned = []
    monkeypatch.setattr(hooks.logger, "warning", lambda msg, *a: warned.append(msg))
    monkeypatch.setattr(hooks, "_noted", set())

    class MyProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return hidden_states

    attn = standalone()
    assert not warned  # upstream's default processor: nothing to say
    attn.set_processor(MyProcessor())
    attn.set_processor(MyProcessor())
    assert len(warned) == 1
    assert "MyProcessor" in warned[0] and "does not go through the diffusers-flash dispatcher" in warned[0]

    class Subclass(ca.CrossAttnProcessor):  # inherits upstream's __call__: still routed, nothing said
        pass

    attn.set_processor(Subclass())
    assert len(warned) == 1


def test_a_negative_slice_size_is_refused_where_upstream_lets_it_through():
    with pytest.raises(ValueError, match="got -8"):
        standalone().set_processor(ca.SlicedAttnProcessor(-8))
