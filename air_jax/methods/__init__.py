"""Decoding methods behind one interface (see `air_jax.methods.base` for the contract), and their registry.

  cfg = air_jax.methods.make("vcd")                 # the preset, official LLaVA-1.5 defaults
  cfg = air_jax.methods.make("dola", relative_top=0.2)
  out = air_jax.generate(model, cfg, image, prompt)
"""

from air_jax.methods import greedy, air, vcd, dola, pai, farsight  # noqa: F401,I001  (registration order)
from air_jax.methods import opera  # noqa: F401,E402  (brings its own search)
from air_jax.methods import halc  # noqa: F401,E402  (brings its own search)
from air_jax.methods.base import (PLAIN, CompiledMethod, Plan, SpecPlan, ViewInputs, as_compiled, hyperparameters,
                                  stack_methods)
from air_jax.methods.registry import describe, make, names, register

__all__ = ["CompiledMethod", "PLAIN", "Plan", "SpecPlan", "ViewInputs", "as_compiled", "describe",
           "hyperparameters", "make", "names", "register", "stack_methods"]
