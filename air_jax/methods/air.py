"""AIR, AIR* and AD-HH as registered methods: `AIRConfig` presets (air_jax.air_config), spec-only methods.

`AIRConfig.compile` returns a `RectificationSpec`; `as_compiled` wraps it in a one-view plan, so AIR behaves
exactly as before the method interface. Overrides are AIRConfig fields (`heads=...` is required by presets that
target the sensitive heads).
"""

from __future__ import annotations

from air_jax.air_config import AIRConfig
from air_jax.methods.registry import register

for _name, _doc in (("air", "AIR (the paper): modality-balanced reallocation + variance-constrained projection"),
                    ("air_star", "AIR* (the official code): rebalance, lens, AD-HH, projection"),
                    ("adhh", "AD-HH baseline: conditional text-attention removal on the sensitive heads")):
  register(_name, lambda _n=_name, **kw: AIRConfig.preset(_n, **kw), _doc, options=("heads",))
