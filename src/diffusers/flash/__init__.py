"""diffusers-flash: what this fork adds to Diffusers, in one package no upstream release uses.

The public API (everything else here is internal):

Attention (``diffusers.flash.attention``)
    ``set_attention_backend(name)``     the process-wide backend (``None``: back to the default)
    ``attention_backend(name)``         a ``with`` block: this backend for every call inside (this thread)
    ``AttentionBackendError``           a named backend cannot serve a call, or the name is unknown
    ``NAMES``                           ``auto`` and every backend's name
    ``backend_status()``                (name, available, reason) for each backend in this process
    ``model.set_attention_backend(name)`` / ``pipe.set_attention_backend(name)``  pin one model / a pipeline's
    models (``"auto"`` or ``None``: follow the process-wide setting). Precedence, strongest first: the ``with``
    block, the model's pin, ``set_attention_backend``, ``$DIFFUSERS_ATTENTION_BACKEND``, ``auto``.

The fast path (``diffusers.flash.fastpath``)
    ``pipe.enable_fast_path(cuda_graphs=True, compile=False, ..., cache=None)``  CUDA graphs, optionally
    torch.compile, for a Stable Diffusion pipeline; returns a report. ``pipe.disable_fast_path()`` undoes it.

Pipelines built locally (``diffusers.flash.local_pipelines``)
    ``stable_diffusion(size="tiny", seed=0)``  a StableDiffusionPipeline with random weights, nothing downloaded
    (``"tiny"``: seconds on a CPU; ``"sd1"``: SD 1.x's full architecture); images of the size asked for.

Loading (``diffusers.flash.loading``)
    ``from_pretrained`` / ``save_pretrained(..., safe_serialization=True)`` as upstream's, made safe: see
    ``diffusers.flash.loading.safe_loading``.

Layout: ``attention/`` (the dispatcher and its backends; the drop-ins for upstream's processors; the adapter
to upstream's own dispatcher; pinning a backend on a model), ``fastpath/`` (CUDA graphs, compile, the compile
helper, the pipeline mixin), ``loading/`` (safe weights), ``compat/`` (today's huggingface_hub, transformers
and jax for Diffusers 0.4), ``cli_env.py`` (``diffusers-cli env`` lines), ``local_pipelines.py`` (pipelines
built locally with random weights), ``base_classes.py`` (what the patches add to Diffusers' base classes).
The patches in ``patches/`` are one-line hooks into these modules; ``cli.py``, ``mixins.py``,
``attention/hooks.py`` and ``attention/mixin.py`` are the paths they import, each the same module object as
the one named here.
"""
from __future__ import annotations

from typing import Any

_ATTENTION = ("set_attention_backend", "attention_backend", "AttentionBackendError", "NAMES", "backend_status")
__all__ = list(_ATTENTION)


def __getattr__(name: str) -> Any:
    # lazy: diffusers.utils imports diffusers.flash.compat early, before torch need be imported
    if name in _ATTENTION:
        from .attention import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module 'diffusers.flash' has no attribute {name!r}")
