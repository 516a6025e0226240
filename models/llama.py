"""Llama decoder (transformers `LlamaModel` + `lm_head`), layers stacked and scanned, optional KV cache.

Params: embed_tokens.weight [V, E]; layers.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj} with a leading layer axis L; norm.weight [E]; lm_head.weight [V, E] unless tied. A
Qwen3-MoE layer's mlp is {gate, experts} instead (models.moe); a decoder that mixes dense and MoE layers has them as
a tuple of per-layer trees.
`layers` may also be a tuple of per-layer trees (`unstack_layers`), run as a Python loop for short chunks (faster
decoding on CPU) and as a scan for long ones (`SCAN_MIN_TOKENS`: one compiled layer).
Cache: {"k", "v"} of shape [L, B, S, K, D] with stacked layers, or with per-layer layers a tuple of per-layer
{"k", "v"} [B*K, D, S] (heads major, slots minor: the layout XLA:CPU's decoding kernels read in place, see
models.attention; `cache_view` gives it a separate batch axis). A chunk of T tokens is written at slot
`write_index` and attends to every visible slot. The cache is returned updated, never mutated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import llama_parts, rope
from models.attention import attend
from models.config import TextConfig
from models.layers import linear, rms_norm
from models.spec import AttnContext, RectificationSpec, layer_slice


def embed_tokens(params: dict, input_ids: jax.Array) -> jax.Array:
  table = params["embed_tokens"]["weight"]
  # Placeholder ids (e.g. an image token outside the vocab) are clamped; they are replaced by image features.
  return jnp.take(table, jnp.clip(input_ids, 0, table.shape[0] - 1), axis=0)


def lm_head(params: dict, lm_params: dict | None, hidden: jax.Array) -> jax.Array:
  """Logits (float32) from final hidden states; tied embeddings when there is no lm_head."""
  w = lm_params["weight"] if lm_params is not None else params["embed_tokens"]["weight"]
  return jnp.einsum("...e,ve->...v", hidden, w.astype(hidden.dtype)).astype(jnp.float32)


# Chunks of at least this many tokens (prefill, full forwards) run the per-layer params as a scan over layers (see
# `decoder`); shorter ones (decoding steps, OPERA's candidate rows) as a Python loop. Read when a function is
# traced: set it before the first call (e.g. a huge value to always loop).
SCAN_MIN_TOKENS = 32


def _to_heads_major(x: jax.Array) -> jax.Array:
  """[B, T, K, D] -> [B*K, D, T] (the per-layer cache layout)."""
  b, t, kv, d = x.shape
  return x.transpose(0, 2, 3, 1).reshape(b * kv, d, t)


def _scanned_hidden(embeds: jax.Array, extras: dict, layers: tuple[int, ...]) -> dict:
  """extras of a scan over layers with its per-layer outputs `hidden` [L, B, T, E] replaced by the residual streams
  after each of `layers` layers (0 = the embeddings): [K, B, T, E]."""
  after = jnp.concatenate([embeds[None], extras["hidden"]])  # [L + 1, B, T, E]
  return dict(extras, hidden=after[jnp.asarray(layers)])


def _layer(cfg: TextConfig, p, x, cos, sin, ctx, spec_l, cache_kv, write_index, want_pattern, want_stats,
           cache_write=True, kv_layout="bskd"):
  b, t, _ = x.shape
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  a = p["self_attn"]
  y = rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps)
  q = linear(a["q_proj"], y).reshape(b, t, h, d)
  k = linear(a["k_proj"], y).reshape(b, t, kv, d)
  if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
    q, k = rms_norm(a["q_norm"], q, cfg.rms_norm_eps), rms_norm(a["k_norm"], k, cfg.rms_norm_eps)
  q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  v = linear(a["v_proj"], y).reshape(b, t, kv, d)
  own, layout = None, "bskd"
  if cache_kv is not None and cache_write:
    ck, cv = cache_kv
    if kv_layout == "heads_major":
      kw, vw, axis = _to_heads_major(k), _to_heads_major(v), 2
    else:
      kw, vw, axis = k, v, 1
    ck = jax.lax.dynamic_update_slice_in_dim(ck, kw.astype(ck.dtype), write_index, axis=axis)
    cv = jax.lax.dynamic_update_slice_in_dim(cv, vw.astype(cv.dtype), write_index, axis=axis)
    k, v, cache_kv, layout = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv), kv_layout
  elif cache_kv is not None:  # read-only cache: the row's own k/v stand in at write_index (see attend)
    own = (k, v, write_index)
    k, v, layout = cache_kv[0].astype(q.dtype), cache_kv[1].astype(q.dtype), kv_layout
  z, extras = attend(q, k, v, ctx, spec_l, want_pattern=want_pattern, want_stats=want_stats, own=own,
                     kv_layout=layout)
  x = x + linear(a["o_proj"], z.reshape(b, t, h * d))
  return llama_parts.mlp_residual(cfg, p, x), cache_kv, extras


def decoder(
    params: dict,
    cfg: TextConfig,
    embeds: jax.Array,
    positions: jax.Array,
    ctx: AttnContext,
    *,
    spec: RectificationSpec | None = None,
    cache: dict | None = None,
    write_index: jax.Array | int = 0,
    output_attentions: bool = False,
    output_stats: bool = False,
    cache_write: bool = True,
    output_hidden_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, dict | None, dict]:
  """Runs all layers on embeds [B, T, E] at positions [B, T] (Llama, or Mistral with its sliding window; Qwen2/3
  options, see TextConfig). With multimodal RoPE, positions are [3, B, T] (see models.rope).

  With `cache_write=False` (one query row), the cache is only read: the row attends to the cached slots before
  `write_index` and to its own key at `write_index`, and the cache is returned unchanged.

  `output_hidden_layers` (static, indices in [0, L]) asks for the residual stream after that many layers (0 = the
  embeddings, L = the last layer's output before the final norm), e.g. for early-exit methods (DoLa).

  Returns final normed hidden states [B, T, E], the updated cache (or None) and extras stacked over layers:
  `attentions` [L, B, H, T, S] and/or `segment_mass` [L, B, H, 3]; `hidden_states` [K, B, T, E] for the K
  requested layers, in the order asked.
  """
  n_layers = cfg.num_hidden_layers
  for i in output_hidden_layers:
    if not 0 <= i <= n_layers:
      raise ValueError(f"output_hidden_layers: layer {i} is outside [0, {n_layers}] for this {n_layers}-layer model")
  cos, sin = rope.cos_sin(cfg, positions, embeds.dtype)
  if cfg.sliding_window is not None:
    # Mistral: key slot k is visible to the query in slot q only if k > q - sliding_window (transformers' overlay).
    near = jnp.arange(ctx.mask.shape[-1])[None, :] > ctx.query_slot[:, None] - cfg.sliding_window
    ctx = ctx.replace(mask=ctx.mask & near[None])
  layers = params["layers"]
  if isinstance(layers, (list, tuple)) and embeds.shape[1] >= SCAN_MIN_TOKENS and llama_parts.uniform(layers):
    # Per-layer buffers, a long chunk: a scan whose step picks layer li's params (and cache) with a switch. The
    # layer, and every attention edit in it, is then compiled once instead of once per layer (AIR's prefill edits
    # dominated its compile time); the switch copies one layer's weights per step, which a compute-bound chunk
    # hardly notices (~5-10 % of a 300-token prefill on CPU, less for longer prompts).
    n, t = len(layers), embeds.shape[1]
    caches_in = None if cache is None else tuple((c["k"], c["v"]) for c in cache)
    written = cache is not None and cache_write

    def step(x, xs):
      spec_l, li = xs
      p = jax.lax.switch(li, [lambda lp=lp: lp for lp in layers])
      cache_kv = None if caches_in is None else jax.lax.switch(li, [lambda c=c: c for c in caches_in])
      x, cache_kv, extras = _layer(cfg, p, x, cos, sin, ctx, spec_l, cache_kv, write_index, output_attentions,
                                   output_stats, cache_write, kv_layout="heads_major")
      if output_hidden_layers:
        extras = dict(extras, hidden=x)  # the output of layer li (the residual stream after li + 1 layers)
      # Only the chunk's keys/values leave the step (not a stacked copy of the whole cache).
      chunk = None if not written else tuple(jax.lax.dynamic_slice_in_dim(c, write_index, t, axis=2)
                                             for c in cache_kv)
      return x, (extras, chunk)

    x, (extras, kv) = jax.lax.scan(step, embeds, (spec, jnp.arange(n)))
    if written:
      put = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, write_index, axis=2)
      cache = tuple({"k": put(c["k"], kv[0][i]), "v": put(c["v"], kv[1][i])} for i, c in enumerate(cache))
    if output_hidden_layers:
      extras = _scanned_hidden(embeds, extras, output_hidden_layers)
  elif isinstance(layers, (list, tuple)):
    # Per-layer buffers (see `unstack_layers`): a Python loop. XLA:CPU reads separate buffers much faster than
    # slices of one stacked array, which matters for bandwidth-bound decoding steps. Layers of different shapes
    # (dense and MoE, TextConfig.mixed_layers) always run here: a scan's switch needs one param shape.
    x, new_cache, per_layer, hidden = embeds, [], [], [embeds]
    for li, p in enumerate(layers):
      spec_l = layer_slice(spec, li)
      cache_kv = None if cache is None else (cache[li]["k"], cache[li]["v"])
      x, cache_kv, extras = _layer(cfg, p, x, cos, sin, ctx, spec_l, cache_kv, write_index, output_attentions,
                                   output_stats, cache_write, kv_layout="heads_major")
      per_layer.append(extras)
      hidden.append(x)
      if cache is not None:
        new_cache.append({"k": cache_kv[0], "v": cache_kv[1]})
    extras = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer[0] else {}
    cache = None if cache is None else tuple(new_cache)
    if output_hidden_layers:
      extras = dict(extras, hidden=jnp.stack([hidden[i] for i in output_hidden_layers]))
  else:
    def step(carry, xs):
      x, cache_c = carry
      p, spec_l, li = xs
      cache_kv = None
      if cache_c is not None:
        cache_kv = (cache_c["k"][li], cache_c["v"][li])
      x, cache_kv, extras = _layer(cfg, p, x, cos, sin, ctx, spec_l, cache_kv, write_index, output_attentions,
                                   output_stats, cache_write)
      if cache_c is not None and cache_write:
        cache_c = {"k": cache_c["k"].at[li].set(cache_kv[0]), "v": cache_c["v"].at[li].set(cache_kv[1])}
      if output_hidden_layers:
        extras = dict(extras, hidden=x)  # the output of layer li (the residual stream after li + 1 layers)
      return (x, cache_c), extras

    layer_ids = jnp.arange(cfg.num_hidden_layers)
    (x, cache), extras = jax.lax.scan(step, (embeds, cache), (layers, spec, layer_ids))
    if output_hidden_layers:
      extras = _scanned_hidden(embeds, extras, output_hidden_layers)
  out = {}
  if output_attentions:
    out["attentions"] = extras["pattern"]
  if output_stats:
    out["segment_mass"] = extras["segment_mass"]
  if output_hidden_layers:
    out["hidden_states"] = extras["hidden"]
  return rms_norm(params["norm"], x, cfg.rms_norm_eps), cache, out


def early_exit_logits(params: dict, lm_params: dict | None, cfg: TextConfig, hidden: jax.Array,
                      final_norm: bool = True) -> jax.Array:
  """Logits (float32) of intermediate hidden states [..., E] through the LM head, with or without the final norm."""
  if final_norm:
    hidden = rms_norm(params["norm"], hidden, cfg.rms_norm_eps)
  return lm_head(params, lm_params, hidden)


def unstack_layers(params: dict) -> dict:
  """Llama params with `layers` as a tuple of per-layer trees (one buffer per layer) instead of stacked."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)))


def stack_layers(params: dict) -> dict:
  """Inverse of `unstack_layers`."""
  layers = params["layers"]
  if not isinstance(layers, (list, tuple)):
    return params
  return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def init_cache(cfg: TextConfig, batch: int, size: int, dtype, per_layer: bool = False):
  """Zeros: {"k", "v"} [L, B, S, K, D], or with per_layer a tuple of L {"k", "v"} [B*K, D, S]."""
  kv, d = cfg.num_key_value_heads, cfg.head_dim
  if per_layer:
    shape = (batch * kv, d, size)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers))
  shape = (cfg.num_hidden_layers, batch, size, kv, d)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_view(cfg: TextConfig, cache):
  """(view, batch_axes, slot_axes) of a per-layer cache: its [B*K, D, S] leaves viewed (no copy) as [B, K, D, S]
  (batch axis 0, slot axis 3). A stacked cache [L, B, S, K, D] is its own view (`Family.cache_view`'s default).
  `cache_from_view` inverts it.
  """
  kv = cfg.num_key_value_heads
  view = jax.tree.map(lambda x: x.reshape(x.shape[0] // kv, kv, *x.shape[1:]), cache)
  return view, jax.tree.map(lambda _: 0, cache), jax.tree.map(lambda _: 3, cache)


def cache_from_view(cfg: TextConfig, view):
  """Inverse of `cache_view` for a per-layer cache (the batch may have changed size, e.g. beams)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), view)
