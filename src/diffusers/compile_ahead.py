# diffusers-flash: the fast path's VAE decoder compile, run in a helper process while this process compiles
# the UNet, so that a fresh process's warm-up is the UNet's compile and not the sum of the two.
"""Compiling ahead in a helper process.

torch.compile's work is serial Python in the process that compiles (lowering, scheduling, code generation:
BENCHMARKS.md, fourth round): a fresh process compiles the UNet (about 55 s on an H100 host) and then the
VAE decoder (about 20 s) one after the other, on one core. When the UNet's first capture of a shape starts,
the shape the VAE decoder will be called with follows (the latents: half the UNet's batch under
classifier-free guidance, its height and width), so a helper process builds a VAE of the same class and
config (random weights: compiled code does not depend on the weights' values), mirrors what inductor's cache
keys depend on (dtype, layout, attention backends, backend flags, inductor options), runs the fast path's own
compile of its decode on that shape and exits. Its compiled code lands in inductor's on-disk caches, and
this process's own compile of the decoder, when the pipeline reaches it, becomes a cache lookup; whether it
did is checked (inductor's hit and miss counters) and reported. In a second process (inductor's cache
already warm: the UNet's compile was all cache hits), or where nothing needed compiling, compiling here is
quicker than the helper's start-up, so the helper is stopped instead of awaited. Once a compile of the model
has been stored (by a helper or here), a note in inductor's cache folder, named by a hash of everything the
helper would mirror and of this package's code, torch and Triton, says so: a later process with that note starts no helper at all (a stopped one cost a
second process about 1 s on an H100 host: BENCHMARKS.md, sixth round). Emptying inductor's cache folder
removes the notes with it; a note whose compile is no longer found only means this process compiles the
model itself, which is reported.

Nothing here can change an image: this process still compiles its own model; a helper that fails, is too
slow or guessed the wrong shape only means this process compiles from scratch, as without the helper (the
reason is logged). No helper is started where it cannot help or could not match: inductor's caches off, too
little free GPU memory or too few CPU cores, autocast on, a model class a new process cannot import, mixed
dtypes, partly frozen or partly training models, inductor options that cannot be passed on.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from .utils import logging

logger = logging.get_logger(__name__)

# the most this process waits for a helper that is still compiling when it needs the compiled model itself
# (the helper started a UNet compile earlier, about a minute, on work of 20-30 s: it has finished unless it
# is stuck, and then compiling here is the quicker way)
WAIT_S = 120.0
# fewer cores than this: the helper's compile would slow this process's own (each is one busy core, plus
# Triton's compile workers)
MIN_CPUS = 4
# GPU memory a helper needs free before it starts: its CUDA context and the model, plus the eager decode's
# activations per image (SD's VAE decoder at 512x512: about 0.8 GiB an image, uncompiled)
BASE_BYTES = 1.5 * 2**30
PER_PIXEL_BYTES = 0.8 * 2**30 / (512 * 512)
REASON_CHARS = 300  # a helper's failure, as reported: the start of its last output line
NOTES = "diffusers_flash_ahead"  # the folder, in inductor's cache folder, of the notes on stored compiles
CACHED = "no helper: an earlier compile of it is in inductor's cache"

_FLAGS = (  # backend flags that change compiled code (and inductor's cache keys): the helper mirrors them
    ("cuda.matmul", "fp32_precision"),  # torch >= 2.9, before the older flags it also sets
    ("cudnn", "fp32_precision"),
    ("cuda.matmul", "allow_tf32"),
    ("cuda.matmul", "allow_fp16_reduced_precision_reduction"),
    ("cuda.matmul", "allow_bf16_reduced_precision_reduction"),
    ("cudnn", "allow_tf32"),
    ("cudnn", "deterministic"),
    ("cudnn", "benchmark"),
)
_SDP = ("flash", "mem_efficient", "math", "cudnn")  # torch.backends.cuda.<x>_sdp_enabled / enable_<x>_sdp

_live = set()  # running helpers, stopped when this process exits


@atexit.register
def _stop_all():
    for helper in list(_live):
        helper.stop()


def _backends(attr_path):
    obj = torch.backends
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def caches_on() -> bool:
    """Whether inductor keeps compiled graphs on disk, where a helper's work can be found."""
    import torch._inductor.config as config

    return bool(getattr(config, "fx_graph_cache", False)) and not getattr(config, "force_disable_caches", False)


def _inductor_globals() -> dict:
    """This process's inductor options that differ from their defaults (they are part of the cache keys)."""
    import torch._inductor.config as config

    out = {}
    entries = getattr(config, "_config", {})
    for key, value in config.save_config_portable().items():
        entry = entries.get(key)
        if entry is not None and value == entry.default:  # set at some point, but to its default
            continue
        if entry is not None or not config._is_default(key):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise ValueError(f"inductor option {key}={value!r} cannot be passed to a helper process") from None
            out[key] = value
    return out


def _sdp_flags() -> dict:
    return {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in _SDP
            if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}


def spec_for(model, attr: str, what: str, mode, shape, options: dict, channels_last: bool) -> dict:
    """What a helper needs to compile ``model.<attr>`` as the fast path does, on inputs of ``shape``; a
    ValueError where a helper could not build the model or match this process's compile."""
    from .models import attention_dispatch
    from .models.attention import AttentionBlock, CrossAttention

    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(f"{cls.__qualname__} is defined in {cls.__module__}: a new process cannot import it")
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"parameters of {len(dtypes)} dtypes")
    if len({p.requires_grad for p in params}) != 1 or len({m.training for m in model.modules()}) != 1:
        raise ValueError("partly frozen or partly in training mode")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {
        "module": cls.__module__, "class": cls.__qualname__, "config": config,
        "attr": attr, "what": what, "mode": mode, "shape": [int(n) for n in shape],
        "dtype": str(params[0].dtype).replace("torch.", ""), "device": str(params[0].device),
        "channels_last": channels_last, "training": model.training, "requires_grad": params[0].requires_grad,
        "backends": {name: attention_dispatch.current(m) for name, m in model.named_modules()
                     if isinstance(m, (CrossAttention, AttentionBlock))},
        "inductor": options,
        "inductor_globals": _inductor_globals(),
        "flags": {f"{where}.{name}": getattr(_backends(where), name) for where, name in _FLAGS
                  if hasattr(_backends(where), name)},
        "sdp": _sdp_flags(),
        "deterministic": [torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()],
    }


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    """A digest of every Python file of this package (computed once): the fork's version string stays the
    same across changes to its code, and any of them can change the compiled graph (and inductor's cache key)."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def note_path(spec: dict):
    """The note saying that inductor's cache holds the compile ``spec`` describes (None where it cannot be
    named): a hash of the spec, this package's code, torch, Triton and the card."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        device = torch.device(spec["device"])
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        text = json.dumps({"spec": spec, "source": _source_digest(), "torch": torch.__version__,
                           "torch_git": getattr(torch.version, "git_version", None), "triton": triton_version,
                           "card": card}, sort_keys=True)
        return os.path.join(cache_dir(), NOTES, hashlib.sha256(text.encode()).hexdigest()[:40])
    except Exception:  # a private path that moved, a spec JSON cannot hold: no note, a helper as before
        return None


def _cache_counts():
    """Inductor's compiled-graph cache hits and misses in this process so far ((0, 0) where not counted)."""
    try:
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    except Exception:
        return 0, 0


def _since(counts):
    return tuple(now - then for now, then in zip(_cache_counts(), counts))


def _key(shape) -> tuple:
    """A shape (torch.Size, list or tuple) as the plain tuple of ints the helpers are filed under."""
    return tuple(int(n) for n in shape)


def memory_needed(shape) -> int:
    pixels = shape[0] * shape[-2] * shape[-1] * 64  # latents are 1/8 of the image each way
    return int(BASE_BYTES + PER_PIXEL_BYTES * pixels)


def _autocast_on(device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


class Helper:
    """One helper process compiling one model's fast-path call for one input shape."""

    def __init__(self, spec: dict):
        self.spec, self.shape = spec, tuple(spec["shape"])
        self.counts = _cache_counts()  # this process's cache hits and misses when the helper started
        text = json.dumps(spec)  # before any file exists: a value JSON cannot hold leaves nothing behind
        fd, self.spec_path = tempfile.mkstemp(prefix="diffusers-flash-ahead-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "diffusers.compile_ahead", self.spec_path],
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except BaseException:
            self._remove_spec()
            raise
        _live.add(self)

    def wait(self, timeout: float = WAIT_S):
        """Wait for the helper; returns None when it compiled, else the reason it did not."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return f"still compiling after {timeout:.0f} s more: stopped"
        except BaseException:  # e.g. an interrupt while waiting: the helper must not outlive this
            self.stop()
            raise
        self._forget()
        if rc == 0:
            return None
        self.log.seek(0)
        lines = [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        return f"exit status {rc}: {last[:REASON_CHARS]}{'...' if len(last) > REASON_CHARS else ''}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the driver: the kernel reaps it; do not hang here
                pass
        self._forget()

    def _forget(self):
        _live.discard(self)
        self._remove_spec()

    def _remove_spec(self):
        try:
            os.remove(self.spec_path)
        except OSError:
            pass


class Ahead:
    """The fast path's helper for one model: ``start(shape)`` when the shape it will be called with is known,
    ``wait(shape)`` just before this process compiles it, ``check(shape)`` after."""

    def __init__(self, model, attr: str, what: str, mode, options: dict, channels_last: bool):
        self.model, self.attr, self.what, self.mode, self.options = model, attr, what, mode, options
        self.channels_last = channels_last
        self.helpers = {}  # shape -> Helper
        self.done = {}  # shape -> None (the helper compiled it and this process read it from the cache) or why not
        self._checking = {}  # shape -> cache counts when this process's own compile of it began
        self.notes = {}  # shape -> the path of its note on a stored compile (None: cannot be named)

    def start(self, shape):
        shape = _key(shape)
        if shape in self.helpers or shape in self.done:
            return
        try:
            if not caches_on():
                raise RuntimeError("inductor's on-disk caches are off")
            cpus = os.cpu_count() or 1
            if cpus < MIN_CPUS:
                raise RuntimeError(f"{cpus} CPU cores: a helper's compile would slow this process's own")
            device = next(self.model.parameters()).device
            if _autocast_on(device):
                raise RuntimeError("autocast is on: a helper would compile another graph")
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                need = memory_needed(shape)
                if free < 2 * need:
                    raise RuntimeError(f"{free / 2**30:.1f} GiB free on the GPU, {2 * need / 2**30:.1f} wanted")
            spec = spec_for(self.model, self.attr, self.what, self.mode, shape, self.options, self.channels_last)
            note = self.notes[shape] = note_path(spec)
            if note is not None and os.path.exists(note):
                self.done[shape] = CACHED
                logger.info(f"fast path: the {self.what} for {shape} compiles in this process, no helper: an earlier "
                            f"compile of it is in inductor's cache")
                return
            helper = Helper(spec)
        except Exception as e:
            self.done[shape] = f"no helper: {type(e).__name__}: {e}"
            logger.info(f"fast path: the {self.what} compiles in this process ({self.done[shape]})")
            return
        self.helpers[shape] = helper
        logger.info(f"fast path: compiling the {self.what} for {shape} in a helper process (pid "
                    f"{helper.proc.pid}) while this one compiles the UNet")

    def wait(self, shape):
        """Before this process's own compile for ``shape``: let a helper working on it finish, unless nothing
        compiled here since it started missed inductor's cache (a second process, whose cache is warm, or
        graphs compiled earlier in this process): then compiling here is quicker than the helper's start-up,
        and it is stopped. Helpers for other shapes were wrong guesses: they are stopped."""
        shape = _key(shape)
        for other in [s for s in self.helpers if s != shape]:
            self.helpers.pop(other).stop()
            self.done[other] = f"stopped: the {self.what} was called for {shape} instead"
        helper = self.helpers.pop(shape, None)
        if shape in self.notes:  # its compile here, whoever did the work, is checked and noted once done
            self._checking[shape] = _cache_counts()
        if helper is None:
            self.done.setdefault(shape, "no helper: the UNet's batch suggested another shape")
            return
        hits, misses = _since(helper.counts)
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
            self._checking[shape] = _cache_counts()  # after the wait: the helper's own counts are its own
            logger.info(f"fast path: the helper has compiled the {self.what} for {shape} (waited "
                        f"{time.perf_counter() - began:.1f} s for it)")
        else:
            logger.warning(f"fast path: the helper process did not compile the {self.what} ({failed}); it "
                           f"compiles here")

    def check(self, shape):
        """After this process's own compile for ``shape``: did it read the helper's (or an earlier) compile
        from the cache? A compile done here, read or not, is noted for later processes."""
        shape = _key(shape)
        counts = self._checking.pop(shape, None)
        if counts is None:
            return
        hits, misses = _since(counts)
        if hits or misses:  # compiled here (from the cache or not): inductor's cache holds it now
            self._note(shape)
        if self.done.get(shape) is not None:  # no helper's work to check: none started, it was stopped or failed
            if self.done[shape] == CACHED and misses:
                self.done[shape] = (f"no helper: an earlier compile of it was noted but not found in inductor's "
                                    f"cache ({hits} hits, {misses} misses): compiled here")
                logger.warning(f"fast path: the {self.what}: {self.done[shape]}")
            elif self.done[shape] == CACHED and hits:
                logger.info(f"fast path: the {self.what}'s compile read an earlier compile from inductor's cache")
            return
        if misses == 0 and hits > 0:
            logger.info(f"fast path: the {self.what}'s compile read the helper's work from inductor's cache")
            return
        if misses == 0:
            self.done[shape] = ("the helper compiled, but this process needed no compile (it reused a graph "
                                "compiled earlier here)")
        else:
            self.done[shape] = (f"the helper compiled, but this process's compile did not find it in inductor's "
                                f"cache ({hits} hits, {misses} misses)")
        logger.info(f"fast path: {self.done[shape]}")

    def _note(self, shape):
        note = self.notes.get(shape)
        if note is None:
            return
        try:
            os.makedirs(os.path.dirname(note), exist_ok=True)
            with open(note, "w") as f:
                json.dump({"what": self.what, "shape": list(shape), "time": time.time()}, f)
        except OSError as e:  # a read-only cache folder: later processes start a helper as before
            logger.debug(f"fast path: no note on the {self.what}'s stored compile ({e})")

    def stop(self):
        for helper in self.helpers.values():
            helper.stop()
        self.helpers.clear()


def _exit_with_parent():
    """The helper ends when the process that started it does (killed, where atexit does not run)."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    """The helper: compile ``spec``'s model call as the fast path does, on random inputs of its shape."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        os.remove(argv[0])
    except OSError:
        pass
    _exit_with_parent()
    import torch._inductor.config as inductor_config

    from . import fast_path

    for key, value in spec["flags"].items():  # in order; only those that differ (setting one sets others)
        where, name = key.rsplit(".", 1)
        if hasattr(_backends(where), name) and getattr(_backends(where), name) != value:
            setattr(_backends(where), name, value)
    for name, on in spec["sdp"].items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    torch.use_deterministic_algorithms(spec["deterministic"][0], warn_only=spec["deterministic"][1])
    for key, value in spec["inductor_globals"].items():
        setattr(inductor_config, key, value)
    cls = importlib.import_module(spec["module"])
    for part in spec["class"].split("."):
        cls = getattr(cls, part)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams and graphs on the parent's GPU, not GPU 0
    with torch.device(device):  # random weights: the compiled code does not depend on their values
        model = cls(**spec["config"])
    model.to(dtype).train(spec["training"]).requires_grad_(spec["requires_grad"])
    modules = dict(model.named_modules())
    for name, backend in spec["backends"].items():
        modules[name]._attention_backend = backend
    fast_path.INDUCTOR_OPTIONS.clear()
    fast_path.INDUCTOR_OPTIONS.update(spec["inductor"])
    report = {"cuda_graphs": [], "compile": [], "channels_last": [], "reasons": []}
    fast_path.apply_to(model, spec["what"], spec["attr"], spec["mode"], report,
                       channels_last=spec["channels_last"], cuda_graphs=device.type == "cuda")
    if spec["what"] not in report["compile"]:
        print(f"not compiled: {report['reasons']}", file=sys.stderr)
        return 3
    x = torch.randn(spec["shape"], device=device, dtype=dtype)
    with torch.no_grad():
        getattr(model, spec["attr"])(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    failed = _failure(model, spec["attr"])
    if failed:  # the fast path ran it uncompiled: nothing useful in the cache
        print(f"the compile failed: {failed}", file=sys.stderr)
        return 4
    return 0


def _failure(model, attr):
    """Why the fast path's compile of ``model.<attr>`` fell back to the uncompiled model, if it did."""
    from . import fast_path

    regions = model.__dict__.get("_fast_path_regions")
    if regions is not None and regions.failed:
        return regions.failed
    fn = model.__dict__.get(attr)
    inner = getattr(fn, "inner", fn)
    return getattr(inner, "failed", None) if isinstance(inner, fast_path.CompiledOrEager) else None


if __name__ == "__main__":
    sys.exit(main())
