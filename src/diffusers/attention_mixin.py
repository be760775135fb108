# diffusers-flash: set_attention_backend() for ModelMixin and DiffusionPipeline (patch 0004 adds this
# mixin to both). Kept out of models/ so that modeling_utils can import it without an import cycle.
import torch


class AttentionBackendMixin:
    """``set_attention_backend(name)`` for models (ModelMixin) and pipelines (all their models).

    Names: see ``diffusers.models.attention_dispatch.NAMES``; an unknown name is refused at once."""

    def set_attention_backend(self, name):
        from .models.attention import AttentionBlock, CrossAttention
        from .models.attention_dispatch import check_name

        check_name(name)
        models = [self] if isinstance(self, torch.nn.Module) else [m for m in vars(self).values()
                                                                     if isinstance(m, torch.nn.Module)]
        for model in models:
            for m in model.modules():
                if isinstance(m, (CrossAttention, AttentionBlock)):
                    m._attention_backend = name
        return self


class PipelineMixin(AttentionBackendMixin):
    """What DiffusionPipeline gains: ``set_attention_backend`` and the fast path."""

    def enable_fast_path(self, cuda_graphs: bool = True, compile: bool = False):
        """Make generation as fast as this GPU allows, with the same images: the UNet step is captured as a
        CUDA graph per input shape and replayed (``compile=True`` runs it through torch.compile first).
        Returns a report of what was applied; what cannot apply is logged and the pipeline runs as before."""
        from . import fast_path

        return fast_path.enable(self, cuda_graphs=cuda_graphs, compile=compile)

    def disable_fast_path(self):
        from . import fast_path

        fast_path.disable(self)
        return self
