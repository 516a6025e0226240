"""Random params for any family's shape tree (nested dicts of shape tuples): for tests and `jax.eval_shape`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_from_shapes(shapes: dict, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """N(0, std) weights, ones for norm weights and layer scales, zeros for biases."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(v, int) for v in x))
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    names = [str(getattr(p, "key", getattr(p, "idx", ""))) for p in path]
    if names[-1] == "bias":
      leaves.append(jnp.zeros(shape, dtype))
    elif any("norm" in n for n in names) or names[-1].startswith("lambda_"):
      leaves.append(jnp.ones(shape, dtype))
    else:
      leaves.append((std * jax.random.normal(k, shape)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)
