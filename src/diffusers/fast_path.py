# diffusers-flash: pipe.enable_fast_path(), the one call that makes generation as fast as the card allows
# while keeping the images: the UNet step is captured once as a CUDA graph per input shape and replayed
# (the same kernels, so the same numbers), optionally after torch.compile.
"""The fast path for Stable Diffusion pipelines.

At one image a UNet step on an H100 spends most of its time launching kernels from Python (eager
26 ms against 12-13 ms of GPU work): replaying a CUDA graph removes that. ``compile=True`` also runs
the UNet through torch.compile (fusions; warm-up reported). Whatever cannot apply (no CUDA, a UNet
that is not on the GPU, a compile failure) is logged with the reason and the pipeline runs as before.
"""
from __future__ import annotations

import time

import torch

from .utils import logging

logger = logging.get_logger(__name__)


class _Captured:
    __slots__ = ("graph", "sample", "timestep", "context", "out")


class GraphedForward:
    """Takes the place of a UNet2DConditionModel's ``forward`` (the UNet object itself stays, so saving,
    ``.to()`` and its config work as before): the first call for each (sample, text) shape captures a
    CUDA graph with static input buffers; later calls copy their inputs in and replay it."""

    def __init__(self, forward, warmup: int = 2):
        self.inner = forward  # the UNet's own forward, or torch.compile of it
        self.warmup = warmup
        self.graphs = {}

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict: bool = True):
        from .models.unet_2d_condition import UNet2DConditionOutput

        if torch.is_grad_enabled() or not sample.is_cuda:  # training or CPU: the plain forward
            return self.inner(sample, timestep, encoder_hidden_states, return_dict=return_dict)
        key = (sample.shape, sample.dtype, sample.device, encoder_hidden_states.shape, encoder_hidden_states.dtype)
        cap = self.graphs.get(key)
        if cap is None:
            cap = self.graphs[key] = self._capture(sample, timestep, encoder_hidden_states)
        cap.sample.copy_(sample)
        cap.timestep.copy_(torch.as_tensor(timestep).reshape(cap.timestep.shape))
        cap.context.copy_(encoder_hidden_states)
        cap.graph.replay()
        out = cap.out.clone()  # schedulers keep past outputs (PNDM): never hand out the static buffer
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _capture(self, sample, timestep, context):
        start = time.perf_counter()
        cap = _Captured()
        cap.sample, cap.context = sample.clone(), context.clone()
        cap.timestep = torch.as_tensor(timestep).to(sample.device).reshape(()).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # kernels pick algorithms and the attention plans are made here
                self.inner(cap.sample, cap.timestep, cap.context)
        torch.cuda.current_stream().wait_stream(side)
        cap.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.graph):
            cap.out = self.inner(cap.sample, cap.timestep, cap.context).sample
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info(f"fast path: captured the UNet step for sample {tuple(sample.shape)} in {seconds:.1f} s")
        return cap


def enable(pipe, cuda_graphs: bool = True, compile: bool = False, compile_mode: str = "default"):
    """Apply the fast path to ``pipe``; returns what was applied and, for what was not, why."""
    report = {"cuda_graphs": False, "compile": False, "reasons": []}
    unet = getattr(pipe, "unet", None)
    if unet is None:
        report["reasons"].append("the pipeline has no UNet")
    elif not torch.cuda.is_available():
        report["reasons"].append("no CUDA device: the pipeline runs as before")
    elif isinstance(unet.__dict__.get("forward"), GraphedForward):
        report["reasons"].append("already enabled")
    elif next(unet.parameters()).device.type != "cuda":
        report["reasons"].append("the UNet is not on a CUDA device: call pipe.to('cuda') first")
    else:
        forward = unet.forward
        if compile:
            try:
                forward = torch.compile(forward, mode=compile_mode, dynamic=False)
                report["compile"] = True
            except Exception as e:  # an old torch, no triton: say so and go on without
                report["reasons"].append(f"torch.compile not applied: {type(e).__name__}: {e}")
        if cuda_graphs:
            forward = GraphedForward(forward)
            report["cuda_graphs"] = True
        unet.forward = forward
    for why in report["reasons"]:
        logger.warning(f"fast path: {why}")
    return report


def disable(pipe):
    unet = getattr(pipe, "unet", None)
    if unet is not None and "forward" in unet.__dict__:
        del unet.forward  # back to the class's own forward
