"""Mixture-of-experts feed-forward: top-k routed experts, optionally plus shared experts.

One routing function serves DeepSeek-V2 (transformers and the official DeepSeek-V2 / DeepSeek-VL2 gating) and
Qwen3-MoE (transformers `Qwen3MoeSparseMoeBlock`); their differences are the fields of `Router`.

Params: gate.weight [X, E] (router), experts.{gate_proj, up_proj}.weight [X, I, E], experts.down_proj.weight
[X, E, I], optional shared_experts.{gate,up,down}_proj (a dense MLP, DeepSeek only).
Legend: N tokens (batch x time flattened), E hidden, X routed experts, I expert width, K top-k.

Routing (scores in float32):
  router logits x @ gate^T, in float32 (DeepSeek: both cast first) or in the input dtype (Qwen3-MoE's F.linear),
  then softmax (or sigmoid) in float32; greedy: top-k of the scores; group_limited_greedy: experts split into n_group
  groups, keep the topk_group groups with the largest max score, zero the rest, then top-k; noaux_tc (official
  DeepSeek code only): choose with scores + e_score_correction_bias, groups ranked by the sum of their top-2,
  weights are the unbiased scores. With norm_topk_prob the K weights are divided by their sum (DeepSeek's official
  code: only when K > 1, sum + 1e-20; Qwen3-MoE: always, plain sum), then multiplied by routed_scaling_factor.
Ties: `jax.lax.top_k` prefers the lower expert index. Experts tied inside the top-k are chosen by both; at a tie on
the k-th place torch.topk's pick on CPU is an artifact of std::nth_element / partial_sort (no index rule: it takes
the higher index in some positions), so exactly tied scores (duplicated router rows) may route differently there
(tested: tests/test_deepseek_v2.py, tests/test_internvl_moe.py). Every token's routed output is
sum_k w_k expert_{i_k}(x), w cast to the input dtype (as both references do).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.layers import activation, linear


@dataclasses.dataclass(frozen=True)
class Router:
  """What routing and the experts need (static; field names follow transformers where they exist)."""

  num_experts: int
  num_experts_per_tok: int
  hidden_act: str = "silu"
  scoring_func: str = "softmax"  # or "sigmoid"
  topk_method: str = "greedy"  # or "group_limited_greedy", "noaux_tc"
  n_group: int | None = None
  topk_group: int | None = None
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  # DeepSeek's official normalisation (skipped for K = 1, 1e-20 added to the sum) vs Qwen3-MoE's plain w / sum(w).
  deepseek_norm: bool = True
  # DeepSeek casts x and the router to float32 before the product; Qwen3-MoE multiplies in the input dtype.
  float32_logits: bool = True


def mlp(act: str, p: dict, x: jax.Array) -> jax.Array:
  """A dense SwiGLU-style MLP: down(act(gate(x)) * up(x))."""
  return linear(p["down_proj"], activation(act)(linear(p["gate_proj"], x)) * linear(p["up_proj"], x))


def route(r: Router, gate: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [N, E] -> (weights [N, K] float32, expert indices [N, K] int32)."""
  if r.float32_logits:
    logits = jnp.einsum("ne,xe->nx", x.astype(jnp.float32), gate["weight"].astype(jnp.float32))
  else:
    logits = jnp.einsum("ne,xe->nx", x, gate["weight"].astype(x.dtype)).astype(jnp.float32)
  scores = jax.nn.softmax(logits, axis=-1) if r.scoring_func == "softmax" else jax.nn.sigmoid(logits)
  n, nx = scores.shape
  k = r.num_experts_per_tok
  if r.topk_method == "greedy":
    w, idx = jax.lax.top_k(scores, k)
  else:
    choice = scores
    if r.topk_method == "noaux_tc":
      choice = scores + gate["e_score_correction_bias"].astype(jnp.float32)[None]
    grouped = choice.reshape(n, r.n_group, nx // r.n_group)
    if r.topk_method == "noaux_tc":
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_scores = grouped.max(-1)
    _, gidx = jax.lax.top_k(group_scores, r.topk_group)
    keep = jnp.zeros((n, r.n_group), bool).at[jnp.arange(n)[:, None], gidx].set(True)
    masked = jnp.where(jnp.repeat(keep, nx // r.n_group, axis=1), choice, 0.0)
    w, idx = jax.lax.top_k(masked, k)
    if r.topk_method == "noaux_tc":
      w = jnp.take_along_axis(scores, idx, axis=1)
  if r.norm_topk_prob and r.deepseek_norm and k > 1:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  elif r.norm_topk_prob and not r.deepseek_norm:
    w = w / w.sum(-1, keepdims=True)
  return w * r.routed_scaling_factor, idx.astype(jnp.int32)


def moe(r: Router, p: dict, x: jax.Array) -> jax.Array:
  """x [..., E] -> routed experts (+ shared experts when `p` has them), [..., E]."""
  shape = x.shape
  xf = x.reshape(-1, shape[-1])
  w, idx = route(r, p["gate"], xf)
  ex = p["experts"]
  act = activation(r.hidden_act)
  n, nx = xf.shape[0], r.num_experts
  if n * r.num_experts_per_tok <= nx:
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
    out = out + mlp(r.hidden_act, p["shared_experts"], x)
  return out


def expert_shapes(num_experts: int, width: int, hidden: int, lead: tuple = ()) -> dict:
  """The routed experts' param shapes (gate and experts, no shared experts), with leading axes `lead` (e.g. (L,))."""
  x, i, e = num_experts, width, hidden
  return {"gate": {"weight": lead + (x, e)},
          "experts": {"gate_proj": {"weight": lead + (x, i, e)}, "up_proj": {"weight": lead + (x, i, e)},
                      "down_proj": {"weight": lead + (x, e, i)}}}
