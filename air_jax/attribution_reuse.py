"""Head ablation that reuses the clean run: removing head h of layer l leaves every layer below l unchanged.

One clean forward of the sequence keeps, per layer, the keys/values, the per-head outputs `z` and the residual
after attention. Ablating head h of layer l then starts from that residual minus head h's share of `o_proj`
(exactly `o_proj` of the gated `z`), runs layer l's MLP and only the layers above l. Two semantics (see
attribution_core):

  current_token: rows are single query rows (slot p - 1 of each scored position p) that attend to the clean
    cache and to their own key/value. Layer j runs once for every ablated row of layers < j together
    ("triangular" batching: row counts grow H per layer), so each weight is read once per position group and
    the ablations cost about half of L*H decoding steps.
  full_sequence: for each layer l, the heads of l (vmapped, `chunk` at a time) rerun layers l+1..L-1 over the
    whole sequence from the clean residual; layers are picked by dynamic index, so the graph holds three
    layer bodies whatever L. The last layer runs its queries, o_proj and MLP on the scored rows only.

Both return log P of every target without ablation and with every head ablated, equal to a plain rerun of the
model with the head's gate at 0 (float rounding aside). They read the decoder layer by layer (models.llama_parts),
so they serve the families whose `Family.supports_layer_reuse(config)` says their decoder is that pre-norm Llama
stack (optionally with Qwen2's q/k/v biases, Qwen3's q/k norms and multimodal RoPE; no sliding window, no
dynamic RoPE): LLaVA-1.5, LLaVA-NeXT, InstructBLIP, Qwen2.5-VL, InternVL. attribution_core runs the plain path
for the others (DeepSeek-VL2).

Shape legend: T tokens, P scored positions (rows P - 1 read), L layers, H heads, E width, V vocab,
G positions per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import llama_parts as lp
from models import rope
from models.config import LlavaConfig
from models.layers import rms_norm
from models.family import family_of


def _target_logprob(lm, lm_head_params, hidden, targets):
  """log P(targets) [...] from final normed hidden [..., E] and targets [...]."""
  from models.llama import lm_head

  logp = jax.nn.log_softmax(lm_head(lm, lm_head_params, hidden), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def clean_run(params, config: LlavaConfig, input_ids, pixel_values, rows):
  """One clean forward of input_ids [1, T] that keeps what ablations reuse.

  Returns (layers, hidden_rows, cos, sin): layers is a list of L dicts {"k", "v": [T, K, D], "z": [T, H, D],
  "mid": [T, E]} (for the last layer "z" [R, H, D] and "mid" [R, E] at `rows` only, the layer's queries,
  o_proj and MLP running on those rows), hidden_rows [R, E] the final normed hidden states at rows.
  """
  cfg = config.text
  lm = params["language_model"]
  fam = family_of(config)
  mask = jnp.ones_like(input_ids)
  x = fam.embed(params, config, input_ids, mask, pixel_values)  # [1, T, E]
  t = x.shape[1]
  # The family's positions ([1, T], or [3, 1, T] for multimodal RoPE): cos/sin [1, T, D] either way.
  cos, sin = rope.cos_sin(cfg, fam.positions(config, input_ids, mask, pixel_values), x.dtype)
  out = []
  nl = cfg.num_hidden_layers
  for li in range(nl):
    p = lp.layer_params(lm["layers"], li)
    y = lp.input_norm(cfg, p, x)
    k, v = lp.project_kv(cfg, p, y, cos, sin)
    if li < nl - 1:
      z = lp.causal_attention(lp.project_q(cfg, p, y, cos, sin), k, v, jnp.arange(t))
      mid = lp.attention_output(cfg, p, x, z)
    else:  # the last layer is read at the scored rows only
      q = lp.project_q(cfg, p, y[:, rows], cos[:, rows], sin[:, rows])
      z = lp.causal_attention(q, k, v, rows)
      mid = lp.attention_output(cfg, p, x[:, rows], z)
    x = lp.mlp_residual(cfg, p, mid)
    out.append({"k": k[0], "v": v[0], "z": z[0], "mid": mid[0]})
  return out, rms_norm(lm["norm"], x[0], cfg.rms_norm_eps), cos, sin


@functools.partial(jax.jit, static_argnames=("config", "group"))
def current_token_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, targets,
                           num_positions, group: int):
  """[P, 1 + L*H] log P(targets[i]): clean, then head l*H + h removed in the row of slot positions[i] - 1.

  Args:
    input_ids: [1, T] (rows after max(positions) - 1 are never read by a scored row).
    positions: [P] int32 target slots (P a multiple of `group`); targets [P] int32.
    num_positions: [] int32, positions to compute (the rest is padding, left at 0).
    group: positions per vectorised group (each group holds G * L * H rows at the last layer).
  """
  cfg = config.text
  nl, nh = cfg.num_hidden_layers, cfg.num_attention_heads
  lm, head_params = params["language_model"], params.get("lm_head")
  rows = (positions - 1).astype(jnp.int32)
  layers, hidden, cos, sin = clean_run(params, config, input_ids, pixel_values, rows)
  clean = _target_logprob(lm, head_params, hidden, targets)  # [P]
  z_rows = [c["z"][rows] if li < nl - 1 else c["z"] for li, c in enumerate(layers)]  # [P, H, D] each
  mid_rows = [c["mid"][rows] if li < nl - 1 else c["mid"] for li, c in enumerate(layers)]  # [P, E] each

  def run_group(gi, out):
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, gi * group, group, axis=0)
    slots = take(rows)
    cos_g, sin_g = cos[0, slots][:, None], sin[0, slots][:, None]  # [G, 1, D]
    x = None  # [G, n, E]: the ablated rows of the layers below, n = li * H
    for li in range(nl):
      p = lp.layer_params(lm["layers"], li)
      # Rows entering here: this layer's heads removed from the clean residual (o_proj is linear in z).
      new = take(mid_rows[li])[:, None, :] - lp.head_outputs(cfg, p, take(z_rows[li]))  # [G, H, E]
      if x is None:
        mid = new
      else:
        y = lp.input_norm(cfg, p, x)
        q = lp.project_q(cfg, p, y, cos_g, sin_g)
        k_own, v_own = lp.project_kv(cfg, p, y, cos_g, sin_g)
        z = lp.cached_row_attention(q, k_own, v_own, layers[li]["k"], layers[li]["v"], slots)
        mid = jnp.concatenate([lp.attention_output(cfg, p, x, z), new], axis=1)
      x = lp.mlp_residual(cfg, p, mid)
    hidden_g = rms_norm(lm["norm"], x, cfg.rms_norm_eps)  # [G, L*H, E]
    logp = _target_logprob(lm, head_params, hidden_g, jnp.broadcast_to(take(targets)[:, None], x.shape[:2]))
    return jax.lax.dynamic_update_slice_in_dim(out, logp, gi * group, axis=0)

  steps = (num_positions + group - 1) // group
  ablated = jax.lax.fori_loop(0, steps, run_group, jnp.zeros((positions.shape[0], nl * nh), jnp.float32))
  return jnp.concatenate([clean[:, None], ablated], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def full_sequence_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, targets, chunk: int):
  """[P, 1 + L*H] log P(targets[i]): clean, then head l*H + h removed at every position.

  chunk: heads of one layer rerun together (each holds a whole sequence's activations).
  """
  cfg = config.text
  nl, nh, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
  lm, head_params = params["language_model"], params.get("lm_head")
  rows = (positions - 1).astype(jnp.int32)
  layers, hidden, cos, sin = clean_run(params, config, input_ids, pixel_values, rows)
  clean = _target_logprob(lm, head_params, hidden, targets)  # [P]
  stack = lp.stacked(lm["layers"])
  final = lambda x: _target_logprob(lm, head_params, rms_norm(lm["norm"], x, cfg.rms_norm_eps), targets)

  # The last layer: its heads only change the scored rows.
  p_last = lp.layer_params(stack, nl - 1)
  new = layers[-1]["mid"][:, None, :] - lp.head_outputs(cfg, p_last, layers[-1]["z"])  # [P, H, E]
  last = jax.vmap(final, in_axes=1)(lp.mlp_residual(cfg, p_last, new))  # [H, P]
  if nl == 1:
    return jnp.concatenate([clean[:, None], last.T], axis=1)

  z_all = jnp.stack([c["z"] for c in layers[:-1]])  # [L-1, T, H, D]
  mid_all = jnp.stack([c["mid"] for c in layers[:-1]])  # [L-1, T, E]

  def per_layer(li):
    p = lp.layer_params(stack, li)
    w = p["self_attn"]["o_proj"]["weight"]  # [E, H * D]
    z_l, mid_l = z_all[li], mid_all[li]

    def one(h):
      w_h = jax.lax.dynamic_slice_in_dim(w, h * d, d, axis=1).astype(z_l.dtype)  # [E, D]
      z_h = jax.lax.dynamic_index_in_dim(z_l, h, axis=1, keepdims=False)  # [T, D]
      x = lp.mlp_residual(cfg, p, mid_l - z_h @ w_h.T)[None]  # [1, T, E]
      x = jax.lax.fori_loop(li + 1, nl - 1, lambda j, x: lp.full_layer(cfg, lp.layer_params(stack, j), x, cos,
                                                                         sin), x)
      return final(lp.layer_at_rows(cfg, p_last, x, cos, sin, rows)[0])  # [P]

    return jax.lax.map(one, jnp.arange(nh), batch_size=min(chunk, nh))  # [H, P]

  below = jax.lax.map(per_layer, jnp.arange(nl - 1))  # [L-1, H, P]
  ablated = jnp.concatenate([below.reshape(-1, below.shape[-1]), last], axis=0)  # [L*H, P]
  return jnp.concatenate([clean[:, None], ablated.T], axis=1)
