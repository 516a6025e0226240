"""Placing per-example image features at the image-token positions of each row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_rows(embeds: jax.Array, input_ids: jax.Array, feats: jax.Array, image_token_id: int) -> jax.Array:
  """Row b's k-th image token takes feats[b, k]: embeds [B, T, E], feats [B, M, E] (M >= image tokens per row)."""
  is_img = input_ids == image_token_id
  order = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
  gathered = jnp.take_along_axis(feats.astype(embeds.dtype), order[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered, embeds)
