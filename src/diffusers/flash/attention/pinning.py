# diffusers-flash: set_attention_backend() for ModelMixin and DiffusionPipeline (patch 0004 adds this
# mixin to ModelMixin, importing this module as diffusers.flash.attention.mixin, and
# diffusers.flash.base_classes.PipelineMixin to DiffusionPipeline).
"""Pinning a backend on a model's or a pipeline's attention modules: :class:`AttentionBackendMixin`."""
from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch

from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["AttentionBackendMixin", "attention_classes"]

# the attention modules whose calls our dispatcher serves, by release: (module, class) pairs, those present
_ATTENTION_CLASSES = (
    ("diffusers.models.attention", "CrossAttention"),  # 0.4-0.11
    ("diffusers.models.attention", "AttentionBlock"),  # 0.4-0.14 (the VAE's)
    ("diffusers.models.cross_attention", "CrossAttention"),  # 0.12-0.14
    ("diffusers.models.attention_processor", "Attention"),  # 0.14 and later
)


def attention_classes() -> tuple[type, ...]:
    """The attention module classes of the installed release (the ones ``set_attention_backend`` pins)."""
    found = []
    for mod, name in _ATTENTION_CLASSES:
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


class AttentionBackendMixin:
    """``set_attention_backend(name)`` for models (ModelMixin) and pipelines (all their models).

    Names: see ``diffusers.flash.attention.dispatch.NAMES``; an unknown name is refused at once. From 0.35
    upstream's ``ModelMixin`` has a ``set_attention_backend`` of its own, for upstream's backend names
    (``native``, ``flash``, ``_native_cudnn``, ...): it hands our names here (:meth:`is_ours`) and keeps its own;
    a pipeline hands upstream's names to each of its models."""

    @staticmethod
    def is_ours(name: str | None) -> bool:
        """Whether ``name`` is ours to take: one of our backend names, None (which unpins), or a name upstream
        does not know either (refused by ours, naming our backends)."""
        from diffusers.flash.attention.dispatch import NAMES

        if name is None or name in NAMES:
            return True
        upstream = getattr(sys.modules.get("diffusers.models.attention_dispatch"), "AttentionBackendName", None)
        return upstream is None or str(name).lower() not in {m.value for m in upstream}

    ours = is_ours  # the name patch 0004 calls in upstream's set_attention_backend (0.35 and later)

    def set_attention_backend(self, name: str | None) -> AttentionBackendMixin:
        """Pin every attention module of this model (or of each of the pipeline's models) to backend ``name``,
        over the process-wide default (``attention_dispatch.set_attention_backend``, then
        ``$DIFFUSERS_ATTENTION_BACKEND``); only ``with attention_backend(...)`` overrides it. ``"auto"`` (or
        ``None``) removes the pin: the modules follow the process-wide default again, ``auto`` unless one is set."""
        from diffusers.flash.attention.dispatch import AUTO, check_name

        models = [self] if isinstance(self, torch.nn.Module) else [m for m in vars(self).values()
                                                                     if isinstance(m, torch.nn.Module)]
        if not self.is_ours(name):
            upstream = [m for m in models if _upstream_method(m) is not None]
            if isinstance(self, torch.nn.Module) or not upstream:
                check_name(name)  # raises: not ours, and no upstream method takes it here
            for model in upstream:
                model.set_attention_backend(name)
            return self
        pin = None if name in (None, AUTO) else check_name(name)
        classes = attention_classes()
        unreached = set()
        for model in models:
            for m in model.modules():
                if isinstance(m, classes):
                    m._attention_backend = pin
                _pin_processor(getattr(m, "processor", None), pin)
                if pin is not None and _calls_sdpa_itself(type(getattr(m, "processor", None))):
                    unreached.add(type(m.processor).__name__)
        if unreached:
            logger.warning(
                f"set_attention_backend({name!r}): {', '.join(sorted(unreached))} call F.scaled_dot_product_attention "
                "themselves, with no module to read a pin from: their calls follow the process-wide backend "
                "(diffusers.flash.set_attention_backend, $DIFFUSERS_ATTENTION_BACKEND, or "
                "`with attention_backend(...)`), not this pin")
        return self


@functools.lru_cache(maxsize=None)
def _calls_sdpa_itself(processor_class: type) -> bool:
    """Whether a processor class of upstream's attention_processor.py calls ``F.scaled_dot_product_attention``
    itself, where patch 0004 made that module's ``F`` ours (0.29 and later): such calls reach our dispatcher
    with no module, so a model's pin cannot reach them (SD3's JointAttnProcessor2_0)."""
    from diffusers.flash.attention.processor_primitives import functional

    module = sys.modules.get(getattr(processor_class, "__module__", ""))
    if module is None or getattr(module, "F", None) is not functional() or not callable(processor_class):
        return False
    try:
        source = inspect.getsource(processor_class.__call__)
    except (OSError, TypeError):
        return False
    return "F.scaled_dot_product_attention(" in source


def _pin_processor(processor: object, pin: str | None) -> None:
    """0.35 and later: upstream's processors of the transformer models pass their ``_attention_backend`` to
    ``dispatch_attention_fn``; ours goes there as a :class:`upstream_dispatch.Pinned` name, which our hook in
    that function serves. Unpinning clears only a pin of ours (upstream's own choice stays)."""
    if processor is None or not hasattr(processor, "_attention_backend"):
        return
    from diffusers.flash.attention.upstream_dispatch import Pinned

    if pin is not None:
        processor._attention_backend = Pinned(pin)
    elif isinstance(processor._attention_backend, Pinned):
        processor._attention_backend = None


def _upstream_method(model: torch.nn.Module) -> object:
    """Upstream's own ``set_attention_backend`` of ``model``'s class (0.35 and later), else None."""
    for klass in type(model).__mro__:
        if klass is AttentionBackendMixin:
            return None
        if "set_attention_backend" in vars(klass):
            return vars(klass)["set_attention_backend"]
    return None
