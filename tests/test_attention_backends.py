"""The backend base class and the flash-attn backend's package check, on the CPU (no kernel runs)."""
from __future__ import annotations

import builtins

import pytest

torch = pytest.importorskip("torch")

from diffusers.flash.attention import dispatch as ad  # noqa: E402
from diffusers.flash.attention import flash_attn_package as fa  # noqa: E402
from diffusers.flash.attention.base import Backend, Call  # noqa: E402


def test_a_backend_with_only_a_runner_runs_through_the_base_class():
    class Doubling(Backend):
        name = "doubling"

        def runner(self, c):
            return lambda q, k, v, scale: 2 * ad.BACKENDS["math"].run(Call(q, k, v, scale))

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    c = Call(q, k, v, 0.3)
    torch.testing.assert_close(Doubling().run(c), 2 * ad.BACKENDS["math"].run(c))


def test_a_backend_with_neither_run_nor_runner_is_refused_when_defined():
    with pytest.raises(TypeError, match="Empty defines neither run"):
        class Empty(Backend):
            name = "empty"


def test_the_flash_attn_package_is_looked_for_once(monkeypatch):
    """FlashAttn's checks run for every new call shape: a missing package must not be imported again each time."""
    tried = []
    real = builtins.__import__

    def counting(name, *args, **kwargs):
        if name.split(".")[0] in ("flash_attn", "flash_attn_interface"):
            tried.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fa._flash_attn_2.cache_clear()
    fa._flash_attn_3.cache_clear()
    monkeypatch.setattr(builtins, "__import__", counting)
    try:
        answers = {fa.FlashAttn().unavailable() for _ in range(5)}
    finally:
        monkeypatch.setattr(builtins, "__import__", real)
        fa._flash_attn_2.cache_clear()
        fa._flash_attn_3.cache_clear()
    assert len(answers) == 1
    assert len(tried) <= 3, tried  # flash_attn_interface once; flash_attn (and its function) once
