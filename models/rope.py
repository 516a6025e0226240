"""Rotary position embeddings (rotate-half convention) with transformers' Llama scaling types.

Frequencies follow `transformers.modeling_rope_utils`: `default`, `linear` (positions divided by factor),
`dynamic` (NTK base stretched once the sequence outgrows `max_position_embeddings`) and `llama3` (wavelength
dependent smoothing). Dynamic scaling depends on the current length, so it is computed from traced positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import TextConfig


def _base_inv_freq(theta, dim: int):
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return 1.0 / (jnp.asarray(theta, jnp.float32) ** exponent)


def _llama3(inv_freq: np.ndarray, rope) -> np.ndarray:
  old_len = rope.original_max_position_embeddings
  low_wavelen = old_len / rope.low_freq_factor
  high_wavelen = old_len / rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_frequencies(cfg: TextConfig, positions: jax.Array) -> jax.Array:
  """Inverse frequencies [head_dim // 2] for a chunk whose (traced) positions are `positions`."""
  rope, dim = cfg.rope, cfg.head_dim
  if rope.rope_type == "dynamic":
    # transformers: seq_len = max(position_ids) + 1, never below max_position_embeddings.
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    base = rope.rope_theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)
  inv = 1.0 / (np.float32(rope.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    inv = _llama3(inv, rope)
  return jnp.asarray(inv, jnp.float32)


def cos_sin(cfg: TextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (computed in float32).

  With `cfg.mrope_section` (multimodal RoPE), positions are [3, B, T] (temporal, height, width; [B, T] means all
  three equal) and frequency section i of the half head_dim reads position row i % 3, as transformers does.
  """
  if cfg.mrope_section is not None:
    return _mrope_cos_sin(cfg, positions, dtype)
  inv = inv_frequencies(cfg, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _mrope_cos_sin(cfg: TextConfig, positions: jax.Array, dtype):
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
  inv = inv_frequencies(cfg, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, T, D/2]
  bounds = np.cumsum((0,) + tuple(cfg.mrope_section))
  freqs = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(cfg.mrope_section))], -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, D] with cos/sin [B, T, D] (rotate-half)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
