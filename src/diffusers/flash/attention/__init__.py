"""Attention: the dispatcher and its backends (``dispatch``, on ``base``; FlashAttention-4 in ``fa4``, the
flash-attn package in ``flash_attn_package``), the drop-ins upstream's processors call
(``processor_primitives``; patch path ``hooks``), the adapter to upstream's own dispatcher
(``upstream_dispatch``, on ``upstream_choice``), and ``set_attention_backend`` on models and pipelines
(``pinning``; patch path ``mixin``). See ``diffusers.flash`` for the public API."""
