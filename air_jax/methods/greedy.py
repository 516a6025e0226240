"""Plain decoding (greedy by default; sampling with generate's do_sample): no view, no edit, no combiner."""

from __future__ import annotations

import dataclasses

from air_jax.methods.base import PLAIN, CompiledMethod, ConfigMixin
from air_jax.methods.registry import register


@dataclasses.dataclass(frozen=True)
class GreedyConfig(ConfigMixin):
  """No intervention. `generate(model, GreedyConfig(), ...)` equals `generate(model, None, ...)`."""

  name: str = "greedy"

  def compile(self, model_config) -> CompiledMethod:
    del model_config
    return PLAIN


register("greedy", lambda **kw: GreedyConfig(**kw), "plain decoding, no intervention")
