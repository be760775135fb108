"""What the pipeline and attention benchmarks share (``python -m bench``).

The machine and versions for the report header, a clock on the device's timeline, the attention
dispatcher (imported lazily, with a clear error while it is absent), medians, tables and JSON.
Imports nothing from diffusers at module level, so it also serves a newest-upstream environment.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

import torch

ENV_VAR = "DIFFUSERS_ATTENTION_BACKEND"
# the dispatcher's names (attention_dispatch.NAMES), plus "installed": leave attention as the installed
# diffusers has it (no set_attention_backend call; the only choice with --external-diffusers)
KNOWN_BACKENDS = ("installed", "auto", "math", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class BenchError(Exception):
    """A problem the user can fix (bad option, missing module): printed as one line, exit 2."""


# ---------------------------------------------------------------------------------------------- dispatcher
def dispatcher() -> ModuleType:
    """diffusers.flash.attention.dispatch, or BenchError saying why it cannot be used."""
    try:
        from diffusers.flash.attention import dispatch as attention_dispatch
    except Exception as e:  # ImportError while it is absent; anything it raises while importing
        raise BenchError(f"the attention dispatcher diffusers.flash.attention.dispatch is not available "
                         f"({type(e).__name__}: {e}); install diffusers-flash with its attention patch") from None
    for name in ("attention", "choose", "backend_status"):
        if not hasattr(attention_dispatch, name):
            raise BenchError(f"diffusers.flash.attention.dispatch has no {name}(); it is older than this benchmark")
    return attention_dispatch


def backend_verdicts(names: Iterable[str]) -> dict[str, str | None]:
    """name -> None (can be used) or the reason it is skipped (dispatcher absent, backend unavailable)."""
    try:
        ad = dispatcher()
    except BenchError as e:
        return {n: (None if n.split("+")[0] == "installed" else str(e)) for n in names}
    status = {n: (ok, why) for n, ok, why in ad.backend_status()}
    out = {}
    for full in names:
        n = full.split("+")[0]
        if n in ("installed", "auto"):
            out[full] = None
        elif n not in status:
            out[full] = f"this attention_dispatch has no backend {n!r} (it has: {', '.join(status)})"
        else:
            ok, why = status[n]
            out[full] = None if ok else f"unavailable: {why}"
    return out


def backend_status_list() -> list[dict[str, Any]]:
    try:
        return [dict(name=n, available=bool(ok), reason=why) for n, ok, why in dispatcher().backend_status()]
    except BenchError as e:
        return [dict(name="*", available=False, reason=str(e))]


def accepted(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that ``fn`` takes (the dispatcher may be older or newer than this script)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def parse_backends(text: str, allowed: Sequence[str] = KNOWN_BACKENDS) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BenchError("--backends is empty")
    # the installed diffusers with torch.compile(unet, mode="reduce-overhead"), or at its best (upstream's recipe)
    peers = ("installed+reduce-overhead", "installed+best")

    def known(n):
        base, plus, fast = n.partition("+")
        return base in allowed and (not plus or (base != "installed" and fast_path_modes(fast) is not None))

    bad = [n for n in names if n not in peers and not known(n)]
    if bad:
        raise BenchError(f"unknown attention backend(s) {', '.join(map(repr, bad))}; choose from: {', '.join(allowed)}"
                         f" (each may end in +graphs, +compile or +regional: the fast path on top, and -graphs,"
                         f" -compile or -regional for the VAE apart, e.g. auto+compile-regional;"
                         f" or {' or '.join(peers)})")
    return list(dict.fromkeys(names))


FAST_MODES = {"graphs": False, "compile": True, "regional": "regional"}


def fast_path_modes(suffix: str) -> tuple[bool | str, bool | str | None] | None:
    """A fast-path suffix ('compile', 'compile-graphs': UNet mode, then the VAE's apart) as enable_fast_path's
    (compile, compile_vae); None if it is not one."""
    parts = suffix.split("-")
    if not 1 <= len(parts) <= 2 or not all(p in FAST_MODES for p in parts):
        return None
    return FAST_MODES[parts[0]], (FAST_MODES[parts[1]] if len(parts) == 2 else None)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{option} takes comma-separated positive integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise BenchError(f"{option} takes comma-separated positive integers, not {text!r}")
    return sorted(set(values))


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Stamps on the device's timeline: CUDA events on a GPU (no synchronisation inside a run), else
    time.perf_counter. ``ms(a, b)`` is valid after ``sync()``."""

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def stamp(self) -> torch.cuda.Event | float:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None, iters: int | None = None) -> dict[str, Any]:
    """Arithmetic peak measured here: the median speed of an n x n x n matmul (the card's floor)."""
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 1024)
    iters = iters or (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    for _ in range(3):
        a @ b
    spans = []
    for _ in range(iters):
        start = clock.stamp()
        a @ b
        spans.append((start, clock.stamp()))
    clock.sync()
    ms = median([clock.ms(s, e) for s, e in spans])
    del a, b
    return dict(tflops=2 * n ** 3 / (ms * 1e-3) / 1e12, n=n, dtype=str(dtype).replace("torch.", ""), ms=ms)


# ---------------------------------------------------------------------------------------------- machine
def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except Exception:
        return None


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def command_line() -> str:
    """This process's command line as it was typed: ``python -m bench ...`` for this package."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py" and os.path.dirname(os.path.abspath(argv[0])) == \
            os.path.dirname(os.path.abspath(__file__)):
        argv[:1] = ["-m", __package__ or "bench"]
    return shlex.join([sys.executable] + argv)


def machine(device: str) -> dict[str, Any]:
    """Card, driver, versions, date and the exact command line, for the JSON and the table header."""
    cuda = torch.device(device).type == "cuda"
    info = dict(card=None, driver=None, torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                diffusers=_version("diffusers"), transformers=_version("transformers"),
                python=platform.python_version(), platform=platform.platform(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=command_line(), attention_env=os.environ.get(ENV_VAR))
    if cuda:
        index = torch.device(device).index or 0
        info["card"] = torch.cuda.get_device_name(index)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2 ** 30, 1)
        smi = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
        if smi:
            info["driver"] = smi
        else:
            v = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
            info["driver"] = f"CUDA driver API {v // 1000}.{v % 1000 // 10} (nvidia-smi not found)" if v else None
    else:
        info["card"] = f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return info


def header(info: dict[str, Any]) -> str:
    cudnn = info["cudnn"]
    cudnn = f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if isinstance(cudnn, int) and cudnn > 9000 else cudnn
    return "\n".join([
        f"# card: {info['card']}; driver {info['driver'] or 'n/a'}",
        f"# torch {info['torch']}, CUDA {info['cuda'] or 'n/a'}, cuDNN {cudnn or 'n/a'}, "
        f"diffusers {info['diffusers']}, transformers {info['transformers']}, Python {info['python']}",
        f"# date {info['date']}; ${ENV_VAR}={info['attention_env'] or '(unset)'}",
        f"# command: {info['command']}",
    ])


# ---------------------------------------------------------------------------------------------- output
def table(columns: Sequence[tuple[str, str | Callable[[dict], Any], str | None]], rows: Iterable[dict]) -> str:
    """A Markdown table; ``columns`` is [(title, key or function of the row, format)]."""
    def cell(row, key, fmt):
        value = key(row) if callable(key) else row.get(key)
        return "-" if value is None else (fmt.format(value) if fmt else str(value))

    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")


def progress(total: int, disable: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: no bar where stderr is not a terminal (logs); rows are still written as they finish
    return tqdm(total=total, disable=True if disable else None, desc=desc, file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def close(self):
        pass
