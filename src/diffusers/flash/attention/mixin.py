# diffusers-flash: set_attention_backend() for ModelMixin and DiffusionPipeline (patch 0004 adds this
# mixin to ModelMixin, and diffusers.flash.mixins.PipelineMixin to DiffusionPipeline).
from __future__ import annotations

import torch


class AttentionBackendMixin:
    """``set_attention_backend(name)`` for models (ModelMixin) and pipelines (all their models).

    Names: see ``diffusers.flash.attention.dispatch.NAMES``; an unknown name is refused at once."""

    def set_attention_backend(self, name):
        """Pin every attention module of this model (or of each of the pipeline's models) to backend ``name``,
        over the process-wide default (``attention_dispatch.set_attention_backend``, then
        ``$DIFFUSERS_ATTENTION_BACKEND``); only ``with attention_backend(...)`` overrides it. ``"auto"`` (or
        ``None``) removes the pin: the modules follow the process-wide default again, ``auto`` unless one is set."""
        from diffusers.models.attention import AttentionBlock, CrossAttention
        from diffusers.flash.attention.dispatch import AUTO, check_name

        if name is not None:
            check_name(name)
        pin = None if name in (None, AUTO) else name
        models = [self] if isinstance(self, torch.nn.Module) else [m for m in vars(self).values()
                                                                     if isinstance(m, torch.nn.Module)]
        for model in models:
            for m in model.modules():
                if isinstance(m, (CrossAttention, AttentionBlock)):
                    m._attention_backend = pin
        return self
