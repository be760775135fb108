"""Compat shims for upstream releases 0.15-0.36 (variants of patches 0002 and 0004): names transformers 5
dropped that those releases import, and upstream's attention registry before 0.37."""
from __future__ import annotations

import contextlib

import pytest
import transformers

from diffusers.flash.attention import upstream_choice, upstream_dispatch
from diffusers.flash.compat import attention_registry, transformers_names


def test_mt5_tokenizer_is_t5_tokenizer_where_transformers_dropped_it():
    # HunyuanDiT's pipelines (0.28-0.36) import MT5Tokenizer, an alias of T5Tokenizer in transformers 4
    assert transformers_names.MT5Tokenizer is getattr(transformers, "MT5Tokenizer", transformers.T5Tokenizer)
    from diffusers.flash.compat.transformers_names import MT5Tokenizer  # the form the variants use

    assert MT5Tokenizer is transformers_names.MT5Tokenizer
    with pytest.raises(AttributeError):
        transformers_names.NoSuchTokenizer  # noqa: B018


def _registry_035():
    """A registry as 0.35-0.36 have it: _active_backend set directly by the context, no set_active_backend."""
    class Registry:
        _active_backend = "native"

    @contextlib.contextmanager
    def attention_backend(backend="native"):
        old = Registry._active_backend
        Registry._active_backend = backend
        try:
            yield
        finally:
            Registry._active_backend = old

    return Registry, attention_backend


def test_tracking_a_registry_without_set_active_backend():
    registry, context = _registry_035()
    with pytest.raises(KeyError):  # what 0.35-0.36 raised at import with 0.37's hook
        upstream_dispatch.track(context, registry)
    registry, context = _registry_035()
    tracked = attention_registry.track(context, registry)
    assert upstream_choice.named.depth == 0
    with tracked("flash"):
        assert registry._active_backend == "flash" and upstream_choice.named.depth == 1
    assert registry._active_backend == "native" and upstream_choice.named.depth == 0
    saved = upstream_choice.named.explicit
    try:
        registry.set_active_backend("_native_math")  # the setter it gained, recorded as a named backend
        assert registry._active_backend == "_native_math" and upstream_choice.named.explicit is True
    finally:
        upstream_choice.named.explicit = saved


def test_a_registry_with_set_active_backend_is_left_as_it_is():
    class Registry:
        _active_backend = "native"

        @classmethod
        def set_active_backend(cls, backend):
            cls._active_backend = backend + "!"

    setter = Registry.__dict__["set_active_backend"]
    attention_registry.track(contextlib.nullcontext, Registry)
    saved = upstream_choice.named.explicit
    try:
        Registry.set_active_backend("x")  # upstream's own setter still runs (wrapped by upstream_dispatch)
        assert Registry._active_backend == "x!" and Registry.__dict__["set_active_backend"] is not setter
    finally:
        upstream_choice.named.explicit = saved
