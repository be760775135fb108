# diffusers-flash: enable_fast_path() / disable_fast_path() for DiffusionPipeline (through
# diffusers.flash.mixins.PipelineMixin, patch 0004), and where the denoising loop keeps its timesteps (0009).
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class FastPathMixin:
    """What DiffusionPipeline gains for the fast path: ``enable_fast_path``, ``disable_fast_path``."""

    def enable_fast_path(self, cuda_graphs: bool = True, compile: bool | str = False, channels_last: bool | None = None,
                         vae: bool = True, text_encoder: bool = True, compile_vae: bool | str | None = None,
                         parallel_compile: bool = True, cache: str | os.PathLike | None = None,
                         trust_cache: bool | str = False) -> dict:
        """Make generation as fast as this GPU allows, with the same images: the UNet step, the VAE decode and the text
        encoders (CLIP, CLIP with projection, T5) are each captured as a CUDA graph per input shape and replayed;
        ``compile=True`` runs the UNet and the VAE decoder through torch.compile first (channels-last weights; about a
        minute of warm-up in a fresh process, cached after); ``compile="regional"`` compiles each repeated block instead
        (slightly slower steps); ``compile_vae`` sets the VAE decoder's apart (default: as ``compile``), e.g. ``False``:
        graphed only; ``parallel_compile`` (default on) compiles the VAE decoder in a helper process while this one
        compiles the UNet, for a shorter warm-up; ``cache="file"`` keeps torch.compile's work in a portable file: loaded
        before compiling (then no helper), written after a compile it lacked, so that a new machine warms up like a
        second process (a damaged file is reported and rewritten). Loading a compile cache runs code from it (torch's
        artifacts contain pickles), so use only files you wrote or trust like code: a file is loaded only where it is
        yours, not writable by others, and signed with your key (``~/.cache/diffusers-flash/cache-key``);
        ``trust_cache=True`` (or the file's sha256) loads a file another machine wrote. SDXL's pipelines (0.19 on) are
        served too: their extra UNet inputs are graph inputs, and a VAE the pipeline would cast to float32 for each
        decode (``force_upcast``) is kept in float32 so that its decode is graphed too (the same arithmetic). Returns a
        report of what was applied; what cannot apply is logged with the reason and runs as before.
        ``disable_fast_path()`` undoes it.
        """
        from diffusers.flash.fastpath import engine as fast_path

        return fast_path.enable(self, cuda_graphs=cuda_graphs, compile=compile, channels_last=channels_last,
                                vae=vae, text_encoder=text_encoder, compile_vae=compile_vae,
                                parallel_compile=parallel_compile, cache=cache, trust_cache=trust_cache)

    @property
    def _timesteps_device(self) -> torch.device | str:
        """Where the denoising loop keeps its timesteps (patch 0009): the host whenever the models run on a
        CUDA device, so that the scheduler's per-step arithmetic on the timestep (PNDM indexes a host table
        with it) does not make the host wait for the GPU at every step. The UNet gets each timestep on the
        GPU without a wait: under the fast path the graphed UNet copies it, otherwise a pre-hook on the UNet
        does (flash/fastpath/host_timesteps.py). Elsewhere the pipeline's device, as upstream."""
        from diffusers.flash.fastpath import engine as fast_path
        from diffusers.flash.fastpath import host_timesteps

        if fast_path.is_enabled(self):
            return "cpu"
        device = getattr(self, "_execution_device", self.device)  # 0.7+: where the models run under offloading
        return host_timesteps.loop_device(self, device)

    def disable_fast_path(self) -> FastPathMixin:
        from diffusers.flash.fastpath import engine as fast_path

        fast_path.disable(self)
        return self
