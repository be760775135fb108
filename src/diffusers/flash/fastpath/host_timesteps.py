# diffusers-flash: the eager denoising loop without a host wait per step (patch 0009 reaches this through
# FastPathMixin._timesteps_device).
#
# Upstream moves the scheduler's timesteps to the GPU before the loop. The scheduler then does its per-step
# arithmetic on a GPU timestep: 0.4.2's PNDM compares it with 0 and indexes its host table alphas_cumprod
# with it, and each of those makes the host wait until the GPU has finished the UNet. The GPU then idles
# while the host prepares the next step (about 0.4 ms a step at 8 images on an H200).
#
# With the timesteps on the host, the scheduler's arithmetic is host arithmetic; the UNet still needs its
# timestep on the GPU, and a plain ``.to("cuda")`` of a host tensor waits for the GPU too. So a forward
# pre-hook on the UNet sends each host timestep to the sample's GPU through pinned memory without waiting:
# the same values in the same dtype, so the same images.
from __future__ import annotations

from typing import Any

import torch

_HOOKED = "_diffusers_flash_host_timesteps"


def to_sample_device(timestep: Any, sample: Any) -> Any:
    """``timestep`` on ``sample``'s device when that is a CUDA device and the timestep is a host tensor
    (copied from pinned memory, not waited for); anything else is returned as it is."""
    if (isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and isinstance(sample, torch.Tensor)
            and sample.device.type == "cuda"):
        return timestep.pin_memory().to(sample.device, non_blocking=True)
    return timestep


def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "timestep" in kwargs:
        sample = args[0] if args else kwargs.get("sample")
        kwargs["timestep"] = to_sample_device(kwargs["timestep"], sample)
    elif len(args) >= 2:
        args = (args[0], to_sample_device(args[1], args[0]), *args[2:])
    return args, kwargs


def attach(unet: Any) -> bool:
    """Whether ``unet`` (a pipeline's UNet) takes host timesteps without a wait: installs the pre-hook the
    first time (once per UNet object). False for anything that is not a torch module."""
    if not isinstance(unet, torch.nn.Module):
        return False
    if not getattr(unet, _HOOKED, False):
        unet.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        setattr(unet, _HOOKED, True)
    return True


def loop_device(pipe: Any, device: torch.device | str) -> torch.device | str:
    """Where the denoising loop of ``pipe`` should keep its timesteps when its models run on ``device``:
    the host for a CUDA device whose pipeline has a UNet (the hook above installed), else ``device``."""
    if torch.device(device).type == "cuda" and attach(getattr(pipe, "unet", None)):
        return "cpu"
    return device
