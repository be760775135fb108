# diffusers-flash: the fast path's VAE decoder compile, run in a helper process while this process compiles
# the UNet, so that a fresh process's warm-up is the UNet's compile and not the sum of the two.
"""Compiling ahead in a helper process.

torch.compile's work is serial Python in the process that compiles: a fresh process compiles the UNet, then
the VAE decoder (16.7-20.8 s on an H100 host). Once the UNet's first capture of a shape shows the shape the
decoder will get, ``Ahead.start`` has a helper process build a model of the same class and config (random
weights: compiled code does not depend on them), dtype, attention backends and backend flags, and run the
compile function it is named (the fast path's) on that shape. Its work lands in inductor's on-disk cache, so
this process's own compile of the decoder becomes a lookup; ``check`` reports whether it was one.

Nothing here can change an image: this process still compiles its own model; a helper that fails, is slow or
got the wrong shape only means this process compiles as without it (the reason is logged). Where nothing
compiled here since the helper started missed inductor's cache (a warm cache), the helper is stopped, not
awaited. No helper is started where it could not help or match (see ``start`` and ``spec_for``). No private
torch API here, and no import of the fast path: what this needs comes in as arguments.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from diffusers.utils import logging

logger = logging.get_logger(__name__)

WAIT_S = 120.0  # the most this process waits for a helper still compiling when it needs the model itself
MIN_CPUS = 4  # fewer cores: the helper's compile would slow this process's own
# GPU memory a helper needs free (twice this): its CUDA context and the model, plus the eager decode's
# activations (SD's VAE decoder at 512x512: about 0.8 GiB an image)
BASE_BYTES = 1.5 * 2**30
PER_PIXEL_BYTES = 0.8 * 2**30 / (512 * 512)
REASON_CHARS = 300  # a helper's failure, as reported: the start of its last output line
# backend settings that change compiled code or inductor's cache keys: mirrored in the helper, in order
FLAGS = ("cuda.matmul.fp32_precision", "cudnn.fp32_precision", "cuda.matmul.allow_tf32",
         "cuda.matmul.allow_fp16_reduced_precision_reduction", "cuda.matmul.allow_bf16_reduced_precision_reduction",
         "cudnn.allow_tf32", "cudnn.deterministic", "cudnn.benchmark")
SDP = ("flash", "mem_efficient", "math", "cudnn")  # torch.backends.cuda.<x>_sdp_enabled / enable_<x>_sdp


def _flag(path: str) -> tuple[Any, str]:
    where, name = path.rsplit(".", 1)
    obj = torch.backends
    for part in where.split("."):
        obj = getattr(obj, part, None)
    return obj, name


def backend_flags() -> dict[str, Any]:
    """The backend settings of ``FLAGS`` this torch has, as this process has them set."""
    return {path: getattr(*_flag(path)) for path in FLAGS if hasattr(*_flag(path))}


def spec_for(model: torch.nn.Module, attr: str, what: str, shape: Sequence[int], target: str, extra: dict) -> dict:
    """What a helper needs to build ``model`` and call ``target`` ("module:function", run there as
    ``function(model, spec)``, returning None or why it failed) on inputs of ``shape``; ``extra`` is for
    that function. A ValueError where a helper could not build the model or match this process's compile."""
    from diffusers.flash.attention import dispatch as attention_dispatch
    from diffusers.flash.attention.mixin import attention_classes

    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(f"{cls.__qualname__} is defined in {cls.__module__}: a new process cannot import it")
    params = list(model.parameters())
    if len({p.dtype for p in params}) != 1:
        raise ValueError(f"parameters of {len({p.dtype for p in params})} dtypes")
    if len({p.requires_grad for p in params}) != 1 or len({m.training for m in model.modules()}) != 1:
        raise ValueError("partly frozen or partly in training mode")
    return {
        "module": cls.__module__, "class": cls.__qualname__, "target": target, "extra": extra,
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "attr": attr, "what": what, "shape": [int(n) for n in shape],
        "dtype": str(params[0].dtype).replace("torch.", ""), "device": str(params[0].device),
        "training": model.training, "requires_grad": params[0].requires_grad,
        "backends": {name: attention_dispatch.current(m) for name, m in model.named_modules()
                     if isinstance(m, attention_classes())},
        "flags": backend_flags(),
        "sdp": {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in SDP
                if hasattr(torch.backends.cuda, f"{n}_sdp_enabled")},
        "deterministic": [torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()],
    }


class Helper:
    """One helper process running ``spec`` (sent on its stdin, which stays open: it exits when this
    process closes it, by ``stop`` or by ending, however it ends)."""

    def __init__(self, spec: dict) -> None:
        text = json.dumps(spec) + "\n"  # first: a value JSON cannot hold starts nothing
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        # written from a thread: a spec larger than the pipe's buffer must not hold up this process
        threading.Thread(target=self._send, args=(text.encode(),), daemon=True).start()

    def _send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError):  # the helper ended, or was stopped, first
            pass

    def wait(self, timeout: float = WAIT_S) -> str | None:
        """Wait for the helper; returns None when it compiled, else the reason it did not."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"still compiling after {timeout:.0f} s more: stopped"
        except BaseException:  # e.g. an interrupt while waiting: the helper must not outlive this
            self.stop()
            raise
        self.stop()
        if rc == 0:
            return None
        self.log.seek(0)
        last = ([line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
                or ["no output"])[-1]
        return f"exit status {rc}: {last[:REASON_CHARS]}{'...' if len(last) > REASON_CHARS else ''}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the driver: the kernel reaps it; do not hang here
                pass
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass


class Ahead:
    """The helper for one model: ``start(shape)`` once the shape it will be called with is known,
    ``wait(shape)`` just before this process compiles it, ``check(shape)`` after. ``target`` and
    ``extra()`` (called at each start): see ``spec_for``; ``counts()``: inductor's cache hits and misses
    so far in this process."""

    def __init__(self, model: torch.nn.Module, attr: str, what: str, target: str, extra: Callable[[], dict],
                 counts: Callable[[], tuple[int, int]]) -> None:
        self.model, self.attr, self.what, self.target, self.extra = model, attr, what, target, extra
        self.counts = counts
        self.helpers = {}  # shape -> (Helper, this process's cache counts when it started)
        self.done = {}  # shape -> None (the helper compiled it, this process read it from the cache) or why not
        self._checking = {}  # shape -> cache counts when this process's own compile of it began

    def _since(self, counts: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(now - then for now, then in zip(self.counts(), counts))

    def start(self, shape: Sequence[int]) -> None:
        shape = tuple(int(n) for n in shape)
        if shape in self.helpers or shape in self.done:
            return
        try:
            cpus = os.cpu_count() or 1
            if cpus < MIN_CPUS:
                raise RuntimeError(f"{cpus} CPU cores: a helper's compile would slow this process's own")
            device = next(self.model.parameters()).device
            if torch.is_autocast_enabled(device.type):  # torch >= 2.4
                raise RuntimeError("autocast is on: a helper would compile another graph")
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                need = 2 * (BASE_BYTES + PER_PIXEL_BYTES * shape[0] * shape[-2] * shape[-1] * 64)  # latents: 1/8
                if free < need:
                    raise RuntimeError(f"{free / 2**30:.1f} GiB free on the GPU, {need / 2**30:.1f} wanted")
            helper = Helper(spec_for(self.model, self.attr, self.what, shape, self.target, self.extra()))
        except Exception as e:
            self.done[shape] = f"no helper: {type(e).__name__}: {e}"
            logger.info(f"fast path: the {self.what} compiles in this process ({self.done[shape]})")
            return
        self.helpers[shape] = (helper, self.counts())
        logger.info(f"fast path: compiling the {self.what} for {shape} in a helper process (pid {helper.proc.pid})")

    def wait(self, shape: Sequence[int]) -> None:
        """Before this process's compile for ``shape``: let its helper finish, unless nothing compiled here
        since it started missed inductor's cache (then compiling here is quicker: it is stopped). Helpers
        for other shapes were wrong guesses: stopped."""
        shape = tuple(int(n) for n in shape)
        for other in [s for s in self.helpers if s != shape]:
            self.helpers.pop(other)[0].stop()
            self.done[other] = f"stopped: the {self.what} was called for {shape} instead"
        helper, counts = self.helpers.pop(shape, (None, None))
        if helper is None:
            self.done.setdefault(shape, "no helper: the UNet's batch suggested another shape")
            return
        hits, misses = self._since(counts)
        if helper.proc.poll() is None and misses == 0:
            helper.stop()
            why = ("inductor's cache is warm (this process's compiles since were cache hits)" if hits else
                   "nothing was compiled here since it started (graphs compiled earlier in this process)")
            self.done[shape] = f"stopped: {why}"
            logger.info(f"fast path: the {self.what} compiles here, the helper is stopped: {why}")
            return
        began = time.perf_counter()
        failed = self.done[shape] = helper.wait()
        if failed is None:
            self._checking[shape] = self.counts()
            logger.info(f"fast path: the helper has compiled the {self.what} for {shape} (waited "
                        f"{time.perf_counter() - began:.1f} s for it)")
        else:
            logger.warning(f"fast path: the helper process did not compile the {self.what} ({failed}); it "
                           f"compiles here")

    def check(self, shape: Sequence[int]) -> None:
        """After this process's compile for ``shape``: did it read the helper's work from the cache?"""
        shape = tuple(int(n) for n in shape)
        counts = self._checking.pop(shape, None)
        if counts is None:  # no helper's work to check: none started, it was stopped or it failed
            return
        hits, misses = self._since(counts)
        if misses == 0 and hits > 0:
            logger.info(f"fast path: the {self.what}'s compile read the helper's work from inductor's cache")
            return
        self.done[shape] = ("the helper compiled, but this process needed no compile (it reused a graph "
                            "compiled earlier here)" if misses == 0 else
                            f"the helper compiled, but this process's compile did not find it in inductor's "
                            f"cache ({hits} hits, {misses} misses)")
        logger.info(f"fast path: {self.done[shape]}")

    def stop(self) -> None:
        for helper, _ in self.helpers.values():
            helper.stop()
        self.helpers.clear()


def _exit_at_eof() -> NoReturn:
    """The helper ends when its stdin closes: the process that started it stopped it or ended. Raw reads:
    a daemon thread blocked in sys.stdin's buffered reader would abort the interpreter's exit."""
    while os.read(0, 1 << 16):
        pass
    os._exit(5)


def main() -> int:
    """The helper: build the spec's model (random weights) and run its target on it."""
    spec = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_exit_at_eof, daemon=True).start()
    for path, value in spec["flags"].items():  # in order; only those that differ (setting one sets others)
        obj, name = _flag(path)
        if hasattr(obj, name) and getattr(obj, name) != value:
            setattr(obj, name, value)
    for name, on in spec["sdp"].items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    torch.use_deterministic_algorithms(spec["deterministic"][0], warn_only=spec["deterministic"][1])
    cls = importlib.import_module(spec["module"])
    for part in spec["class"].split("."):
        cls = getattr(cls, part)
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams and graphs on the parent's GPU, not GPU 0
    with torch.device(device):
        model = cls(**spec["config"])
    model.to(getattr(torch, spec["dtype"])).train(spec["training"]).requires_grad_(spec["requires_grad"])
    modules = dict(model.named_modules())
    for name, backend in spec["backends"].items():
        modules[name]._attention_backend = backend
    module, _, function = spec["target"].partition(":")
    failed = getattr(importlib.import_module(module), function)(model, spec)
    if failed:
        print(failed, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
