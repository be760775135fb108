# diffusers-flash: the adapter between upstream's own attention dispatcher (models/attention_dispatch.py, 0.35
# and later) and ours. Patch 0004 calls serve() at the top of upstream's dispatch_attention_fn and wraps
# upstream's attention_backend() context with track().
"""Our dispatcher inside upstream's ``dispatch_attention_fn``; upstream's backend API wins where it is used.

From 0.35 upstream's transformer models call ``dispatch_attention_fn`` (tensors (batch, seq, heads, head
dim)), which runs a backend from upstream's registry: the one a processor was given by upstream's
``ModelMixin.set_attention_backend``, else the active one (``attention_backend(...)``, or
``$DIFFUSERS_ATTN_BACKEND``, default ``native``). Here:

- where the user has named an upstream backend (:func:`upstream_choice.upstream_backend` says which),
  upstream's registry serves the call exactly as upstream would, also in the UNet's and the VAE's
  processors (``processor_primitives.sdpa`` hands such calls to ``dispatch_attention_fn``);
- where none is named, :func:`serve` hands the call to our dispatcher: ``auto`` (explaining its choices at
  debug level) or the backend named through our API (``diffusers.flash.attention.dispatch``). Calls our
  dispatcher does not take (an attention mask, dropout, causal, grouped query heads under ``auto``, context
  parallelism, backend-specific keywords) are left to upstream's ``native``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from diffusers.flash.attention import dispatch, processor_primitives
from diffusers.flash.attention.upstream_choice import named, upstream_backend

__all__ = ["Pinned", "serve", "track"]


def track(context: Callable, registry: type) -> Callable:
    """Upstream's ``attention_backend`` context manager, telling :func:`upstream_choice.upstream_backend` while
    it is active; also records upstream's ``set_active_backend`` calls (``ModelMixin.set_attention_backend``
    makes one)."""
    setter = registry.__dict__["set_active_backend"].__func__

    def set_active_backend(cls: type, backend: Any) -> Any:
        named.explicit = True
        return setter(cls, backend)

    registry.set_active_backend = classmethod(set_active_backend)

    @contextlib.contextmanager
    def attention_backend(*args: Any, **kwargs: Any) -> Iterator[None]:
        saved = named.explicit
        named.depth += 1
        try:
            with context(*args, **kwargs):
                yield
        finally:
            named.depth -= 1
            named.explicit = saved

    attention_backend.__doc__ = context.__doc__
    attention_backend.__wrapped__ = context
    return attention_backend


class Pinned(str):
    """A backend of ours pinned on one of upstream's attention processors by our ``set_attention_backend``
    (0.35 and later: the transformer models' processors, which hand their ``_attention_backend`` to
    ``dispatch_attention_fn`` as ``backend``). :func:`serve` takes it; upstream's registry never sees it."""

    __slots__ = ()


def serve(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
          dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
          attention_kwargs: dict[str, Any] | None, backend: Any, parallel_config: Any) -> torch.Tensor | None:
    """The call served by our dispatcher (tensors (batch, seq, heads, head dim), upstream's layout), or None
    where upstream's registry serves it: a backend named upstream's way, context parallelism, keywords for
    a particular backend, or extras (mask, dropout, causal, GQA) while our choice is ``auto``. A backend
    named through our API that cannot serve the call raises the reason. A backend of ours pinned on the
    processor (:class:`Pinned`) serves it unless upstream's context names one."""
    if isinstance(backend, Pinned) and upstream_backend() is None:
        if parallel_config is not None or attention_kwargs:
            raise dispatch.AttentionBackendError(
                f"attention backend {str(backend)!r} (set_attention_backend) cannot serve this call: it has "
                + ("a context-parallel configuration" if parallel_config is not None else
                   f"backend-specific keywords {sorted(attention_kwargs)}")
                + "; name one of upstream's backends for this model")
        name = dispatch.backend_for(pin=str(backend))
    elif backend is not None or parallel_config is not None or attention_kwargs or upstream_backend() is not None:
        return None
    else:
        name = dispatch.backend_for()
        if name == dispatch.AUTO and (attn_mask is not None or dropout_p or is_causal or enable_gqa
                                      or query.dim() != 4):
            return None
    out = processor_primitives.sdpa_on(name, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                       attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return out.transpose(1, 2)
