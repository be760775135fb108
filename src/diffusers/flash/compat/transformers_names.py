# diffusers-flash: transformers names that Diffusers 0.25-0.36 import and transformers 5 dropped (patch
# 0002-transformers-compat.patch's variants for those releases), beside flash/compat/transformers.py's.
"""``MT5Tokenizer`` was an alias of ``T5Tokenizer`` in transformers 4 (``models/mt5/__init__.py``);
transformers 5 has only ``T5Tokenizer``. HunyuanDiT's pipelines (Diffusers 0.28-0.36) import the old name.
Nothing here imports transformers until a name is used."""
from __future__ import annotations

import importlib
from typing import Any

ALIASES = {"MT5Tokenizer": "T5Tokenizer"}


def __getattr__(name: str) -> Any:
    if name in ALIASES:
        transformers = importlib.import_module("transformers")
        return getattr(transformers, name, None) or getattr(transformers, ALIASES[name])
    raise AttributeError(name)
