"""DeepSeek MoE feed-forward: shared experts plus top-k routed experts (transformers / official DeepSeek-V2 gating).

Params: gate.weight [X, E] (router, float32 math), experts.{gate_proj, up_proj}.weight [X, I, E],
experts.down_proj.weight [X, E, I], shared_experts.{gate,up,down}_proj (a dense MLP of width I * n_shared).
Legend: N tokens (batch x time flattened), E hidden, X routed experts, I moe_intermediate_size, K top-k.

Routing (scores in float32 from the float32 router logits):
  softmax (or sigmoid) scores; greedy: top-k of the scores; group_limited_greedy: experts split into n_group
  groups, keep the topk_group groups with the largest max score, zero the rest, then top-k; noaux_tc (official
  code only): choose with scores + e_score_correction_bias, groups ranked by the sum of their top-2, weights are
  the unbiased scores. Weights are multiplied by routed_scaling_factor, after dividing by their sum when
  norm_topk_prob and K > 1 (official code; transformers' DeepseekV2 has no such normalisation).
Ties: `jax.lax.top_k` prefers the lower expert index, as torch.topk does on CPU (tested with duplicated router
rows). Every token's routed output is sum_k w_k expert_{i_k}(x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.deepseek_v2_config import DeepseekV2TextConfig
from models.layers import activation, linear


def mlp(cfg: DeepseekV2TextConfig, p: dict, x: jax.Array) -> jax.Array:
  act = activation(cfg.hidden_act)
  return linear(p["down_proj"], act(linear(p["gate_proj"], x)) * linear(p["up_proj"], x))


def route(cfg: DeepseekV2TextConfig, gate: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [N, E] -> (weights [N, K] float32, expert indices [N, K] int32)."""
  logits = jnp.einsum("ne,xe->nx", x.astype(jnp.float32), gate["weight"].astype(jnp.float32))
  scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
  n, nx = scores.shape
  k = cfg.num_experts_per_tok
  if cfg.topk_method == "greedy":
    w, idx = jax.lax.top_k(scores, k)
  else:
    choice = scores
    if cfg.topk_method == "noaux_tc":
      choice = scores + gate["e_score_correction_bias"].astype(jnp.float32)[None]
    grouped = choice.reshape(n, cfg.n_group, nx // cfg.n_group)
    if cfg.topk_method == "noaux_tc":
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_scores = grouped.max(-1)
    _, gidx = jax.lax.top_k(group_scores, cfg.topk_group)
    keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], gidx].set(True)
    masked = jnp.where(jnp.repeat(keep, nx // cfg.n_group, axis=1), choice, 0.0)
    w, idx = jax.lax.top_k(masked, k)
    if cfg.topk_method == "noaux_tc":
      w = jnp.take_along_axis(scores, idx, axis=1)
  if k > 1 and cfg.norm_topk_prob:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def moe(cfg: DeepseekV2TextConfig, p: dict, x: jax.Array) -> jax.Array:
  """x [B, T, E] -> routed experts + shared experts, [B, T, E]."""
  shape = x.shape
  xf = x.reshape(-1, shape[-1])
  w, idx = route(cfg, p["gate"], xf)
  ex = p["experts"]
  act = activation(cfg.hidden_act)
  n, nx = xf.shape[0], cfg.n_routed_experts
  if n * cfg.num_experts_per_tok <= nx:
    # Few tokens (decoding): gather the chosen experts' weights, read K experts per token instead of all X.
    g = jnp.take(ex["gate_proj"]["weight"], idx, axis=0).astype(x.dtype)  # [N, K, I, E]
    u = jnp.take(ex["up_proj"]["weight"], idx, axis=0).astype(x.dtype)
    d = jnp.take(ex["down_proj"]["weight"], idx, axis=0).astype(x.dtype)  # [N, K, E, I]
    hmid = act(jnp.einsum("ne,nkie->nki", xf, g)) * jnp.einsum("ne,nkie->nki", xf, u)
    out = jnp.einsum("nki,nkei,nk->ne", hmid, d, w.astype(x.dtype))
  else:
    # Many tokens (prefill): every expert on every token, combined with the dense [N, X] routing weights.
    dense_w = jnp.zeros((n, nx), jnp.float32).at[jnp.arange(n)[:, None], idx].add(w).astype(x.dtype)
    hmid = act(jnp.einsum("ne,xie->nxi", xf, ex["gate_proj"]["weight"].astype(x.dtype)))
    hmid = hmid * jnp.einsum("ne,xie->nxi", xf, ex["up_proj"]["weight"].astype(x.dtype))
    out = jnp.einsum("nxi,xei,nx->ne", hmid, ex["down_proj"]["weight"].astype(x.dtype), dense_w)
  out = out.reshape(shape)
  if "shared_experts" in p:
    out = out + mlp(cfg, p["shared_experts"], x)
  return out
