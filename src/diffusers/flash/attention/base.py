# diffusers-flash: what every attention backend builds on (one call, the backend base class), apart from the
# dispatcher so that backends in their own modules (fa4.py) import it without an import circle.
"""One attention call (:class:`Call`) and the base class of the backends (:class:`Backend`), whose limits
are data turned into plain sentences by :meth:`Backend.reasons`."""
from __future__ import annotations

from collections.abc import Callable

import torch

HALF = (torch.float16, torch.bfloat16)
Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # (q, k, v, scale) -> output


class Call:
    """One attention call: q (B, H, Sq, D), k and v (B, H, Sk, D), softmax scale, fp32 softmax or not."""

    __slots__ = ("q", "k", "v", "scale", "upcast")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, upcast: bool = False) -> None:
        self.q, self.k, self.v, self.scale, self.upcast = q, k, v, scale, upcast

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def key(self) -> tuple:
        """What the dispatcher's verdicts depend on: device, dtype, shapes, strides, upcast."""
        q, k = self.q, self.k
        return (q.device, q.dtype, tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), self.v.stride(),
                self.upcast)

    def describe(self) -> str:
        b, h, sq, d = self.q.shape
        return (f"batch {b}, heads {h}, query length {sq}, key length {self.k.shape[2]}, head dim {d}, "
                f"{str(self.q.dtype).replace('torch.', '')} on {self.q.device}")


class Backend:
    """An attention kernel and its limits: the devices, dtypes, largest head dim and smallest compute capability
    it serves (None: no limit), read by :meth:`reasons`; :meth:`unavailable` and :meth:`more_reasons` add what
    data cannot say."""

    name = ""
    devices = ("cuda",)
    dtypes = HALF
    max_head_dim = None
    min_capability = None

    def unavailable(self) -> str | None:
        """Why this backend cannot serve any call in this process (None: it can serve some)."""
        if "cuda" in self.devices and len(self.devices) == 1 and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def reasons(self, c: Call) -> list[str]:
        """Why this backend cannot serve ``c``, in plain sentences (empty: it can)."""
        why = []
        if c.q.device.type not in self.devices:
            why.append(f"device {c.q.device.type} not in {{{', '.join(self.devices)}}}")
        if self.dtypes and c.q.dtype not in self.dtypes:
            names = ", ".join(str(t).replace("torch.", "") for t in self.dtypes)
            why.append(f"dtype {str(c.q.dtype).replace('torch.', '')} not in {{{names}}}")
        if self.max_head_dim and c.head_dim > self.max_head_dim:
            why.append(f"head dim {c.head_dim} > {self.max_head_dim}")
        if self.min_capability and c.q.device.type == "cuda":
            cap = torch.cuda.get_device_capability(c.q.device)
            if cap < self.min_capability:
                why.append(f"compute capability {cap[0]}.{cap[1]} < {self.min_capability[0]}.{self.min_capability[1]}")
        if not why:
            gone = self.unavailable()
            why = [gone] if gone else self.more_reasons(c)
        return why

    def more_reasons(self, c: Call) -> list[str]:
        """Why this backend cannot serve ``c``, beyond the limits held as data (empty: it can)."""
        return []

    def run(self, c: Call) -> torch.Tensor:
        """The attention output for ``c``. A backend overrides this or :meth:`runner`, or both."""
        return self.runner(c)(c.q, c.k, c.v, c.scale)

    def runner(self, c: Call) -> Runner:
        """A callable (q, k, v, scale) serving every call shaped like ``c`` (planned once, then cached)."""
        upcast = c.upcast
        return lambda q, k, v, scale: self.run(Call(q, k, v, scale, upcast))

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not any("run" in vars(k) or "runner" in vars(k) for k in cls.__mro__ if k is not Backend):
            raise TypeError(f"attention backend {cls.__name__} defines neither run() nor runner()")


def _compiling() -> bool:
    return getattr(torch.compiler, "is_compiling", lambda: False)()  # torch 2.3+
