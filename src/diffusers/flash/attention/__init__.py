"""The attention dispatcher (``dispatch``), its FlashAttention-4 backend (``fa4``) and the model mixin
(``mixin``): see ``diffusers.flash`` for the public API."""
