"""DeepSeek-V2 decoder (transformers `DeepseekV2Model` + `lm_head`): MLA attention (models.mla), dense MLP in the
first `first_k_dense_replace` layers, shared + routed experts (models.moe) after.

Params (transformers names): embed_tokens.weight [V, E]; layers: a tuple of per-layer trees (dense and MoE layers
have different shapes, so they are not stacked) with input_layernorm, self_attn.{q_proj | q_a_proj, q_a_layernorm,
q_b_proj}, self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}, post_attention_layernorm and
mlp.{gate_proj, up_proj, down_proj} (dense) or mlp.{gate, experts, shared_experts} (MoE); norm.weight;
lm_head.weight unless tied.
With use_mla = False (DeepSeek-VL2-Tiny) each layer's attention is transformers' LlamaAttention instead
(self_attn.{q,k,v,o}_proj, GQA, rotate-half RoPE): a head is then an ordinary Llama head.
Cache: a tuple of per-layer {"ckv": [B, S, R], "kpe": [B, S, Dr]} (see models.mla), or {"k", "v"} [B, S, K, D]
without MLA. Same decoder signature as
models.llama.decoder, so the decoding loop and attribution drive it unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import llama_parts, mla, moe, rope
from models.attention import attend
from models.deepseek_v2_config import DeepseekV2TextConfig
from models.layers import linear, rms_norm
from models.llama import embed_tokens, lm_head  # noqa: F401  (same embedding and head as Llama)
from models.spec import AttnContext, RectificationSpec, layer_slice


def mha_attention(cfg: DeepseekV2TextConfig, a: dict, y, cos, sin, ctx, spec_l, cache, write_index, want_pattern,
                  want_stats, cache_write=True):
  """The use_mla = False variant: transformers' LlamaAttention (GQA, rotate-half RoPE); cache {"k", "v"} [B, S, K, D]."""
  b, t, _ = y.shape
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  q = rope.apply_rope(linear(a["q_proj"], y).reshape(b, t, h, d), cos, sin)
  k = rope.apply_rope(linear(a["k_proj"], y).reshape(b, t, kv, d), cos, sin)
  v = linear(a["v_proj"], y).reshape(b, t, kv, d)
  own = None
  if cache is not None and cache_write:
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), write_index, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), write_index, axis=1)
    cache = {"k": ck, "v": cv}
    k, v = ck.astype(y.dtype), cv.astype(y.dtype)
  elif cache is not None:
    own = (k, v, write_index)
    k, v = cache["k"].astype(y.dtype), cache["v"].astype(y.dtype)
  z, extras = attend(q, k, v, ctx, spec_l, want_pattern=want_pattern, want_stats=want_stats, own=own)
  return linear(a["o_proj"], z.reshape(b, t, h * d)), cache, extras


def _layer(cfg, li, p, x, cos, sin, ctx, spec_l, cache, write_index, want_pattern, want_stats, cache_write):
  y = rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps)
  attn = mla.attention if cfg.use_mla else mha_attention
  a, cache, extras = attn(cfg, p["self_attn"], y, cos, sin, ctx, spec_l, cache, write_index, want_pattern,
                          want_stats, cache_write)
  x = x + a
  y = rms_norm(p["post_attention_layernorm"], x, cfg.rms_norm_eps)
  y = moe.moe(cfg.router, p["mlp"], y) if cfg.is_moe(li) else moe.mlp(cfg.hidden_act, p["mlp"], y)
  return x + y, cache, extras


def decoder(
    params: dict,
    cfg: DeepseekV2TextConfig,
    embeds: jax.Array,
    positions: jax.Array,
    ctx: AttnContext,
    *,
    spec: RectificationSpec | None = None,
    cache=None,
    write_index: jax.Array | int = 0,
    output_attentions: bool = False,
    output_stats: bool = False,
    cache_write: bool = True,
    output_hidden_layers: tuple[int, ...] = (),
):
  """All layers on embeds [B, T, E] at positions [B, T]; returns (normed hidden, cache, extras) like llama.decoder,
  including `hidden_states` [K, B, T, E] for `output_hidden_layers` (0 = the embeddings, L = the last layer's
  output before the final norm; early-exit methods such as DoLa)."""
  n_layers = cfg.num_hidden_layers
  for i in output_hidden_layers:
    if not 0 <= i <= n_layers:
      raise ValueError(f"output_hidden_layers: layer {i} is outside [0, {n_layers}] for this {n_layers}-layer model")
  if cfg.use_mla:
    cos, sin = mla.cos_sin(cfg, positions)
  else:
    cos, sin = rope.cos_sin(cfg.llama_view, positions, embeds.dtype)
  x, new_cache, per_layer, hidden = embeds, [], [], [embeds]
  for li, p in enumerate(params["layers"]):
    c = None if cache is None else cache[li]
    x, c, extras = _layer(cfg, li, p, x, cos, sin, ctx, layer_slice(spec, li), c, write_index, output_attentions,
                          output_stats, cache_write)
    per_layer.append(extras)
    new_cache.append(c)
    hidden.append(x)
  extras = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer[0] else {}
  out = {}
  if output_attentions:
    out["attentions"] = extras["pattern"]
  if output_stats:
    out["segment_mass"] = extras["segment_mass"]
  if output_hidden_layers:
    out["hidden_states"] = jnp.stack([hidden[i] for i in output_hidden_layers])
  return rms_norm(params["norm"], x, cfg.rms_norm_eps), (None if cache is None else tuple(new_cache)), out


def value_norms(params: dict, cfg: DeepseekV2TextConfig, states: jax.Array) -> jax.Array:
  """||W_O^h v_j^h|| [L, B, H, T] from states [L, B, T, E] (the residual stream entering each layer); MLA's
  values come from the normed latent through kv_b_proj, the MHA variant's from v_proj (heads sharing one)."""
  h = cfg.num_attention_heads
  out = []
  for li, p in enumerate(params["layers"]):
    a = p["self_attn"]
    y = rms_norm(p["input_layernorm"], states[li], cfg.rms_norm_eps)
    b, t, _ = y.shape
    if cfg.use_mla:
      ckv = rms_norm(a["kv_a_layernorm"], linear(a["kv_a_proj_with_mqa"], y)[..., :cfg.kv_lora_rank], 1e-6)
      kv = linear(a["kv_b_proj"], ckv).reshape(b, t, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
      v = kv[..., cfg.qk_nope_head_dim:]
    else:
      kv = cfg.num_key_value_heads
      v = jnp.repeat(linear(a["v_proj"], y).reshape(b, t, kv, cfg.head_dim), h // kv, axis=2)
    out.append(llama_parts.head_write_norms(v, a["o_proj"]["weight"]))
  return jnp.stack(out)


def qk_factors(params: dict, cfg: DeepseekV2TextConfig, layer: int, fold_norm: bool = True):
  """(a, b) [H, D, E] float64 numpy with W_QK^h = a[h]^T b[h] (RoPE ignored) for the MHA variant (use_mla =
  False, no attention bias). MLA's keys pass through the latent's RMSNorm, so its scores are not bilinear."""
  if cfg.use_mla or cfg.attention_bias:
    raise ValueError("W_QK analyses need bilinear attention scores; this DeepSeek-V2 decoder has "
                     f"{'use_mla (keys through the latent RMSNorm)' if cfg.use_mla else 'attention_bias'}")
  return llama_parts.layer_qk_factors(params["layers"][layer], cfg.num_attention_heads, cfg.num_key_value_heads,
                                      cfg.head_dim, fold_norm)


def init_cache(cfg: DeepseekV2TextConfig, batch: int, size: int, dtype, per_layer: bool = True):
  """Zeros: a tuple of L {"ckv": [B, S, R], "kpe": [B, S, Dr]} (MLA; always per layer), or {"k", "v"} [B, S, K, D]
  for the use_mla = False variant."""
  del per_layer
  if not cfg.use_mla:
    shape = (batch, size, cfg.num_key_value_heads, cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers))
  return tuple({"ckv": jnp.zeros((batch, size, cfg.kv_lora_rank), dtype),
                "kpe": jnp.zeros((batch, size, cfg.qk_rope_head_dim), dtype)} for _ in range(cfg.num_hidden_layers))


def param_shapes(cfg: DeepseekV2TextConfig) -> dict:
  """The decoder's param tree with shape-tuple leaves (transformers names, experts stacked on a leading axis)."""
  e, h = cfg.hidden_size, cfg.num_attention_heads
  qk, r, dr = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim

  def lin(o, i, bias=False):
    d = {"weight": (o, i)}
    if bias:
      d["bias"] = (o,)
    return d

  def dense(width):
    mb = cfg.mlp_bias
    return {"gate_proj": lin(width, e, mb), "up_proj": lin(width, e, mb), "down_proj": lin(e, width, mb)}

  layers = []
  for li in range(cfg.num_hidden_layers):
    ab = cfg.attention_bias
    if not cfg.use_mla:
      d, kv = cfg.head_dim, cfg.num_key_value_heads
      attn = {"q_proj": lin(h * d, e, ab), "k_proj": lin(kv * d, e, ab), "v_proj": lin(kv * d, e, ab),
              "o_proj": lin(e, h * d, ab)}
    else:
      attn = {"kv_a_proj_with_mqa": lin(r + dr, e, ab), "kv_a_layernorm": {"weight": (r,)},
              "kv_b_proj": lin(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), r), "o_proj": lin(e, h * cfg.v_head_dim, ab)}
    if cfg.use_mla and cfg.q_lora_rank is None:
      attn["q_proj"] = lin(h * qk, e)
    elif cfg.use_mla:
      attn.update(q_a_proj=lin(cfg.q_lora_rank, e, cfg.attention_bias), q_a_layernorm={"weight": (cfg.q_lora_rank,)},
                  q_b_proj=lin(h * qk, cfg.q_lora_rank))
    if cfg.is_moe(li):
      x, i = cfg.n_routed_experts, cfg.moe_intermediate_size
      m = moe.expert_shapes(x, i, e)
      if cfg.topk_method == "noaux_tc":
        m["gate"]["e_score_correction_bias"] = (x,)
      if cfg.n_shared_experts:
        m["shared_experts"] = dense(i * cfg.n_shared_experts)
    else:
      m = dense(cfg.intermediate_size)
    layers.append({"input_layernorm": {"weight": (e,)}, "post_attention_layernorm": {"weight": (e,)},
                   "self_attn": attn, "mlp": m})
  tree = {"embed_tokens": {"weight": (cfg.vocab_size, e)}, "layers": tuple(layers), "norm": {"weight": (e,)}}
  return tree
