# diffusers-flash: set_attention_backend() for ModelMixin and DiffusionPipeline (patch 0004 adds this
# mixin to both). Kept out of models/ so that modeling_utils can import it without an import cycle.
from __future__ import annotations

import os

import torch


class AttentionBackendMixin:
    """``set_attention_backend(name)`` for models (ModelMixin) and pipelines (all their models).

    Names: see ``diffusers.models.attention_dispatch.NAMES``; an unknown name is refused at once."""

    def set_attention_backend(self, name):
        """Pin every attention module of this model (or of each of the pipeline's models) to backend ``name``,
        over the process-wide default (``attention_dispatch.set_attention_backend``, then
        ``$DIFFUSERS_ATTENTION_BACKEND``); only ``with attention_backend(...)`` overrides it. ``"auto"`` (or
        ``None``) removes the pin: the modules follow the process-wide default again, ``auto`` unless one is set."""
        from .models.attention import AttentionBlock, CrossAttention
        from .models.attention_dispatch import AUTO, check_name

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


class PipelineMixin(AttentionBackendMixin):
    """What DiffusionPipeline gains: ``set_attention_backend`` and the fast path."""

    def enable_fast_path(self, cuda_graphs: bool = True, compile: bool | str = False, channels_last: bool | None = None,
                         vae: bool = True, text_encoder: bool = True, compile_vae: bool | str | None = None,
                         parallel_compile: bool = True, cache: str | os.PathLike | None = None) -> dict:
        """Make generation as fast as this GPU allows, with the same images: the UNet step, the VAE decode and
        the text encoder are each captured as a CUDA graph per input shape and replayed; ``compile=True`` runs
        the UNet and the VAE decoder through torch.compile first (channels-last weights; about a minute of
        warm-up in a fresh process, cached after); ``compile="regional"`` compiles each repeated block instead
        (slightly slower steps); ``compile_vae`` sets the VAE decoder's apart (default: as ``compile``), e.g.
        ``False``: graphed only; ``parallel_compile`` (default on) compiles the VAE decoder in a helper process
        while this one compiles the UNet, for a shorter warm-up; ``cache="file"`` keeps torch.compile's work in
        a portable file: loaded before compiling (then no helper), written after a compile it lacked, so that
        a new machine warms up like a second process (a damaged or foreign file is reported and rewritten;
        it holds pickled code: use only files you wrote). Returns a report of what was applied; what cannot
        apply is logged with the reason and runs as before. ``disable_fast_path()`` undoes it."""
        from . import fast_path

        return fast_path.enable(self, cuda_graphs=cuda_graphs, compile=compile, channels_last=channels_last,
                                vae=vae, text_encoder=text_encoder, compile_vae=compile_vae,
                                parallel_compile=parallel_compile, cache=cache)

    @property
    def _timesteps_device(self):
        """Where the denoising loop keeps its timesteps (patch 0009): the pipeline's device as upstream, or the
        host under the fast path, so that the scheduler's per-step arithmetic on the timestep (PNDM indexes a
        host table with it) does not make the host wait for the GPU at every step; the graphed UNet copies
        each timestep to the GPU once."""
        from . import fast_path

        if fast_path.is_enabled(self):
            return "cpu"
        return getattr(self, "_execution_device", self.device)  # 0.7+: where the models run under offloading

    def disable_fast_path(self):
        from . import fast_path

        fast_path.disable(self)
        return self
