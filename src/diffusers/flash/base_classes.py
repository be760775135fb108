# diffusers-flash: what the patches add to Diffusers' base classes (patch 0004): ModelMixin gains
# AttentionBackendMixin, DiffusionPipeline gains PipelineMixin.
"""The classes patch 0004 adds to Diffusers' base classes (imported as ``diffusers.flash.mixins``)."""
from diffusers.flash.attention.pinning import AttentionBackendMixin
from diffusers.flash.fastpath.mixin import FastPathMixin

__all__ = ["AttentionBackendMixin", "FastPathMixin", "PipelineMixin"]


class PipelineMixin(AttentionBackendMixin, FastPathMixin):
    """What DiffusionPipeline gains: ``set_attention_backend`` (every model of the pipeline) and the fast path."""
