"""The Llama decoder layer cut into parts, for computations that reuse a clean run (head attribution).

`models.llama._layer` = qkv -> attention -> x + o_proj(z) -> mlp_residual. Attribution needs the pieces
separately: the clean run's per-head outputs `z` and post-attention residual, one head's share of `o_proj`, and
attention of a few query rows against a clean KV cache. Nothing here edits attention (no spec): these parts
serve clean runs and head ablations, which act at the `z` site only.

Shape legend: T rows of a sequence, R query rows, N rows per position group, E width, H query heads,
K key/value heads (G = H // K), D head dim, S key slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import moe, rope
from models.attention import NEG
from models.config import TextConfig
from models.layers import activation, linear, rms_norm


def layer_params(layers, index: int | jax.Array):
  """One layer's params from `layers` (stacked with a leading L axis, or a tuple of per-layer trees)."""
  if isinstance(layers, (list, tuple)):
    return layers[index]
  if isinstance(index, int):
    return jax.tree.map(lambda a: a[index], layers)
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False), layers)


def uniform(layers) -> bool:
  """Whether every layer has the same param structure and shapes (stacked layers always do; a tuple of per-layer
  trees does unless it mixes dense and MoE layers)."""
  if not isinstance(layers, (list, tuple)):
    return True
  first = jax.tree.structure(layers[0]), [a.shape for a in jax.tree.leaves(layers[0])]
  return all((jax.tree.structure(lp), [a.shape for a in jax.tree.leaves(lp)]) == first for lp in layers[1:])


def stacked(layers):
  """`layers` with a leading L axis (stacks a tuple of per-layer trees; they must be `uniform`)."""
  if isinstance(layers, (list, tuple)):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return layers


def project_q(cfg: TextConfig, p, y, cos, sin):
  """Rotated queries [B, T, H, D] from normed inputs y [B, T, E] (Qwen3's per-head q norm before RoPE)."""
  b, t, _ = y.shape
  q = linear(p["self_attn"]["q_proj"], y).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = rms_norm(p["self_attn"]["q_norm"], q, cfg.rms_norm_eps)
  return rope.apply_rope(q, cos, sin)


def project_kv(cfg: TextConfig, p, y, cos, sin):
  """Rotated keys and values [B, T, K, D] from normed inputs y [B, T, E] (Qwen3's per-head k norm before RoPE)."""
  b, t, _ = y.shape
  a = p["self_attn"]
  k = linear(a["k_proj"], y).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
  if cfg.qk_norm:
    k = rms_norm(a["k_norm"], k, cfg.rms_norm_eps)
  v = linear(a["v_proj"], y).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
  return rope.apply_rope(k, cos, sin), v


def input_norm(cfg: TextConfig, p, x):
  return rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps)


def causal_attention(q, k, v, query_slots):
  """q [B, R, H, D] at key slots query_slots [R] over k/v [B, S, K, D]: key s visible iff s <= slot."""
  b, r, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, r, kv, h // kv, d)
  scores = (jnp.einsum("brkgd,bskd->bkgrs", qg, k) * jnp.asarray(d**-0.5, q.dtype)).astype(jnp.float32)
  visible = jnp.arange(k.shape[1])[None, :] <= query_slots[:, None]  # [R, S]
  pattern = jax.nn.softmax(jnp.where(visible, scores, NEG), axis=-1)
  return jnp.einsum("bkgrs,bskd->brkgd", pattern.astype(v.dtype), v).reshape(b, r, h, d)


def cached_row_attention(q, k_own, v_own, k_cache, v_cache, slots):
  """Rows that attend to a shared clean cache before their slot and to their own key/value at it.

  q [P, N, H, D], k_own/v_own [P, N, K, D]: N rows per position group p, all at key slot slots[p];
  k_cache/v_cache [S, K, D] (unbatched: one copy for every row). Key s < slots[p] comes from the cache, the
  slot itself from the row (exactly a decoding step whose cache write is not shared with other rows).
  Returns z [P, N, H, D].
  """
  p, n, h, d = q.shape
  kv = k_cache.shape[1]
  g = h // kv
  scale = jnp.asarray(d**-0.5, q.dtype)
  qg = q.reshape(p, n, kv, g, d)
  cached = (jnp.einsum("pnkgd,skd->pnkgs", qg, k_cache) * scale).astype(jnp.float32)
  own = (jnp.einsum("pnkgd,pnkd->pnkg", qg, k_own) * scale).astype(jnp.float32)
  before = jnp.arange(k_cache.shape[0])[None, :] < slots[:, None]  # [P, S]
  cached = jnp.where(before[:, None, None, None, :], cached, NEG)
  pattern = jax.nn.softmax(jnp.concatenate([cached, own[..., None]], axis=-1), axis=-1).astype(v_cache.dtype)
  z = jnp.einsum("pnkgs,skd->pnkgd", pattern[..., :-1], v_cache)
  z = z + pattern[..., -1:] * v_own[:, :, :, None, :]
  return z.reshape(p, n, h, d)


def attention_output(cfg: TextConfig, p, x, z):
  """The residual after attention: x + o_proj(z), z [..., H, D]."""
  return x + linear(p["self_attn"]["o_proj"], z.reshape(z.shape[:-2] + (cfg.num_attention_heads * cfg.head_dim,)))


def head_outputs(cfg: TextConfig, p, z):
  """Each head's share of o_proj (bias excluded): z [..., H, D] -> [..., H, E]."""
  w = p["self_attn"]["o_proj"]["weight"]  # [E, H * D]
  w = w.reshape(w.shape[0], cfg.num_attention_heads, cfg.head_dim).astype(z.dtype)
  return jnp.einsum("...hd,ehd->...he", z, w)


def feed_forward(cfg: TextConfig, m, y):
  """A layer's feed-forward on normed y [..., E]: the dense MLP, or (Qwen3-MoE) the routed experts when its params
  `m` hold them (the layer's param structure decides, statically)."""
  if "experts" in m:
    return moe.moe(cfg.moe, m, y)
  return linear(m["down_proj"], activation(cfg.hidden_act)(linear(m["gate_proj"], y)) * linear(m["up_proj"], y))


def mlp_residual(cfg: TextConfig, p, x):
  """x + MLP(post_attention_layernorm(x)) (dense or MoE, see `feed_forward`)."""
  return x + feed_forward(cfg, p["mlp"], rms_norm(p["post_attention_layernorm"], x, cfg.rms_norm_eps))


def full_layer(cfg: TextConfig, p, x, cos, sin):
  """One clean causal layer over x [B, T, E] (no padding): the `_layer` of models.llama without a spec."""
  y = input_norm(cfg, p, x)
  k, v = project_kv(cfg, p, y, cos, sin)
  z = causal_attention(project_q(cfg, p, y, cos, sin), k, v, jnp.arange(x.shape[1]))
  return mlp_residual(cfg, p, attention_output(cfg, p, x, z))


def layer_at_rows(cfg: TextConfig, p, x, cos, sin, rows):
  """A clean causal layer's output at query rows `rows` [R] only: x [B, T, E] -> [B, R, E].

  Keys and values come from every row; queries, o_proj and the MLP run on the R rows (the last layer of a run
  whose output is read at a few rows).
  """
  y = input_norm(cfg, p, x)
  k, v = project_kv(cfg, p, y, cos, sin)
  q = project_q(cfg, p, y[:, rows], cos[:, rows], sin[:, rows])
  z = causal_attention(q, k, v, rows)
  return mlp_residual(cfg, p, attention_output(cfg, p, x[:, rows], z))


def value_norms(layers, cfg: TextConfig, states):
  """||W_O^h v_j^h|| [L, B, H, T]: the norm of what key j writes into the residual stream through head h per unit
  of attention, from states [L, B, T, E], the residual stream entering each layer (the o_proj bias, shared by all
  heads, is left out)."""
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  out = []
  for li in range(cfg.num_hidden_layers):
    p = layer_params(layers, li)
    y = input_norm(cfg, p, states[li])
    b, t, _ = y.shape
    v = jnp.repeat(linear(p["self_attn"]["v_proj"], y).reshape(b, t, kv, d), h // kv, axis=2)  # head h reads h // G
    out.append(head_write_norms(v, p["self_attn"]["o_proj"]["weight"]))
  return jnp.stack(out)


def head_write_norms(v, o_weight):
  """||W_O^h v_t^h|| [B, H, T] float32 from per-head values v [B, T, H, Dv] and o_proj's weight [E, H * Dv]."""
  h, dv = v.shape[2], v.shape[3]
  wo = o_weight.reshape(-1, h, dv)  # [E, H, Dv]
  w = jnp.einsum("bthd,ehd->bthe", v.astype(jnp.float32), wo.astype(jnp.float32))
  return jnp.linalg.norm(w, axis=-1).transpose(0, 2, 1)


def qk_factors(layers, cfg: TextConfig, layer: int, fold_norm: bool = True):
  """(a, b) [H, D, E] float64 numpy of one layer with W_QK^h = a[h]^T b[h] (RoPE ignored; key heads repeated for
  the query heads that share them). With fold_norm the input norm's gain is folded in (W_QK on RMS-normalised
  states). Only a bilinear score has such factors: q/k biases or q/k norms are refused by name."""
  if cfg.attention_bias or cfg.qkv_bias or cfg.qk_norm:
    field = "qk_norm" if cfg.qk_norm else ("qkv_bias" if cfg.qkv_bias else "attention_bias")
    raise ValueError(f"W_QK analyses need bilinear attention scores; this decoder has {field} (q/k biases or "
                     "norms), so x_i^T W_QK x_j is not its score")
  return layer_qk_factors(layer_params(layers, layer), cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, fold_norm)


def layer_qk_factors(p, num_heads: int, num_kv_heads: int, head_dim: int, fold_norm: bool = True):
  """(a, b) [H, D, E] float64 numpy from one layer's q_proj / k_proj (and input_layernorm gain with fold_norm)."""
  import numpy as np

  h, kv, d = num_heads, num_kv_heads, head_dim
  a = np.asarray(p["self_attn"]["q_proj"]["weight"], np.float64).reshape(h, d, -1)
  b = np.repeat(np.asarray(p["self_attn"]["k_proj"]["weight"], np.float64).reshape(kv, d, -1), h // kv, axis=0)
  if fold_norm:
    g = np.asarray(p["input_layernorm"]["weight"], np.float64)
    a, b = a * g, b * g
  return a, b
