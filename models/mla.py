"""Multi-head latent attention (DeepSeek-V2) with the three intervention sites, over a compressed latent cache.

What a "head" is under MLA (for AIR, attribution and head ablation): the latent c_kv [B, S, R] is shared by all
heads, but after the up-projection `kv_b_proj` each head h has its own key k_h = [k_nope_h ; k_rope] (k_rope, the
decoupled RoPE key, is shared by all heads) and its own value v_h. Head h is the attention of q_h against those
keys: `scores` [B, H, T, S] = q_h . k_h * softmax_scale (before the mask), `pattern` its softmax, and `z` [B, T, H, Dv]
the per-head value mix sum_s pattern[h, t, s] v_h[s] before `o_proj`. These are exactly the per-head tensors of
transformers' eager DeepseekV2Attention (whose `attentions` output is `pattern`), so head_gate[l, h] = 0 removes
head h's contribution to o_proj, as for a Llama head.

Shape legend: B batch, T query rows, S key slots, E hidden, H heads, R kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim.
Cache per layer: {"ckv": [B, S, R] (the normed latent), "kpe": [B, S, Dr] (the rotated rope key)}: R + Dr numbers
per token instead of 2 * H * D. Keys and values are up-projected from the cache at attention time.
RoPE: interleaved pairs (x[2i], x[2i+1]) rotated as complex numbers (transformers' `apply_rotary_emb`), cos/sin
scaled by the rope attention factor (yarn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import attend
from models.deepseek_v2_config import DeepseekV2TextConfig, rope_inv_freq
from models.layers import linear, rms_norm


def cos_sin(cfg: DeepseekV2TextConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, Dr/2] float32 for integer positions [B, T] (times the rope attention factor)."""
  inv, factor = rope_inv_freq(cfg)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  return jnp.cos(freqs) * factor, jnp.sin(freqs) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x [B, T, N, Dr] (in float32, cast back) with cos/sin [B, T, Dr/2]."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _expand(cfg: DeepseekV2TextConfig, a: dict, ckv: jax.Array, kpe: jax.Array):
  """Latent cache -> per-head keys [B, S, H, Dn + Dr] and values [B, S, H, Dv]."""
  b, s, _ = ckv.shape
  h, dn = cfg.num_attention_heads, cfg.qk_nope_head_dim
  kv = linear(a["kv_b_proj"], ckv).reshape(b, s, h, dn + cfg.v_head_dim)
  k_nope, v = kv[..., :dn], kv[..., dn:]
  k = jnp.concatenate([k_nope, jnp.broadcast_to(kpe[:, :, None, :], (b, s, h, cfg.qk_rope_head_dim))], axis=-1)
  return k, v


def attention(cfg: DeepseekV2TextConfig, a: dict, y: jax.Array, cos, sin, ctx, spec_l, cache, write_index,
              want_pattern: bool, want_stats: bool, cache_write: bool = True):
  """MLA on normed hidden states y [B, T, E]. Returns (o_proj output [B, T, E], new cache or None, extras)."""
  b, t, _ = y.shape
  h, dn, dr, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
  if cfg.q_lora_rank is None:
    q = linear(a["q_proj"], y)
  else:
    q = linear(a["q_b_proj"], rms_norm(a["q_a_layernorm"], linear(a["q_a_proj"], y), 1e-6))
  q = q.reshape(b, t, h, dn + dr)
  q = jnp.concatenate([q[..., :dn], apply_rope(q[..., dn:], cos, sin)], axis=-1)
  c = linear(a["kv_a_proj_with_mqa"], y)
  ckv = rms_norm(a["kv_a_layernorm"], c[..., :r], 1e-6)
  kpe = apply_rope(c[..., r:][:, :, None, :], cos, sin)[:, :, 0]
  own = None
  if cache is not None and cache_write:
    cc = jax.lax.dynamic_update_slice_in_dim(cache["ckv"], ckv.astype(cache["ckv"].dtype), write_index, axis=1)
    cp = jax.lax.dynamic_update_slice_in_dim(cache["kpe"], kpe.astype(cache["kpe"].dtype), write_index, axis=1)
    cache = {"ckv": cc, "kpe": cp}
    k, v = _expand(cfg, a, cc.astype(y.dtype), cp.astype(y.dtype))
  elif cache is not None:  # read-only cache: the row's own key/value stand in at write_index (see attend)
    k_own, v_own = _expand(cfg, a, ckv, kpe)
    own = (k_own, v_own, write_index)
    k, v = _expand(cfg, a, cache["ckv"].astype(y.dtype), cache["kpe"].astype(y.dtype))
  else:
    k, v = _expand(cfg, a, ckv, kpe)
  z, extras = attend(q, k, v, ctx, spec_l, want_pattern=want_pattern, want_stats=want_stats, own=own,
                     scale=cfg.softmax_scale)
  return linear(a["o_proj"], z.reshape(b, t, h * cfg.v_head_dim)), cache, extras
