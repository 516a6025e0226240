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

Experts (`routed_experts`, chosen statically by `prefill_impl`): decoding (N * K <= X) gathers the K chosen experts'
weights per token; more tokens run only the routed (token, slot) pairs, sorted by expert into contiguous groups, as
grouped products (`jax.lax.ragged_dot` on TPU, which has a native ragged-dot instruction; elsewhere a scan over
tiles of one expert each, since XLA:CPU lowers ragged_dot to a product over every group and its GPU lowering could
not be measured here). "dense" (every expert on every token, X / K times the work and an
[N, X, I] intermediate) is kept as the reference the tests compare with. bench/moe.py measures them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.layers import activation, linear

# Rows per tile of the "tiled" experts (CPU): 64 was fastest of 16-128 for both bench/moe.py layers at 512 and 2048
# tokens.
TILE = 64


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
  # How the routed experts run (a static choice, not a model property): "auto" (gather for decoding, else ragged_dot
  # on TPU, the tiled scan elsewhere), or one of "gather", "dense", "ragged", "tiled" for every N (`prefill_impl`).
  experts_impl: str = "auto"


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
  out = routed_experts(r, p["experts"], xf, w, idx).reshape(shape)
  if "shared_experts" in p:
    out = out + mlp(r.hidden_act, p["shared_experts"], x)
  return out


def prefill_impl(r: Router, n: int) -> str:
  """The routed-experts algorithm for n tokens (static): `r.experts_impl` unless "auto", which gathers the chosen
  experts' weights when n * K <= X (decoding), else runs grouped products over the sorted (token, slot) rows:
  `jax.lax.ragged_dot` on TPU (a native instruction), the tiled scan elsewhere. XLA:CPU lowers ragged_dot to a dense
  product over every group, K times the dense path's work and memory (bench/moe.py); on GPU it was not measurable
  here, and the tiled scan bounds the memory either way ("ragged" forces it)."""
  if r.experts_impl != "auto":
    return r.experts_impl
  if n * r.num_experts_per_tok <= r.num_experts:
    return "gather"
  return "ragged" if jax.default_backend() == "tpu" else "tiled"


def routed_experts(r: Router, ex: dict, xf: jax.Array, w: jax.Array, idx: jax.Array) -> jax.Array:
  """sum_k w[n, k] expert_{idx[n, k]}(xf[n]): xf [N, E], w [N, K] float32, idx [N, K] -> [N, E] in xf's dtype."""
  act = activation(r.hidden_act)
  impl = prefill_impl(r, xf.shape[0])
  if impl == "gather":
    # Few tokens (decoding): gather the chosen experts' weights, read K experts per token instead of all X.
    g = jnp.take(ex["gate_proj"]["weight"], idx, axis=0).astype(xf.dtype)  # [N, K, I, E]
    u = jnp.take(ex["up_proj"]["weight"], idx, axis=0).astype(xf.dtype)
    d = jnp.take(ex["down_proj"]["weight"], idx, axis=0).astype(xf.dtype)  # [N, K, E, I]
    hmid = act(jnp.einsum("ne,nkie->nki", xf, g)) * jnp.einsum("ne,nkie->nki", xf, u)
    return jnp.einsum("nki,nkei,nk->ne", hmid, d, w.astype(xf.dtype))
  if impl == "dense":
    # Every expert on every token, combined with the dense [N, X] routing weights: X / K times the needed work.
    n, nx = xf.shape[0], r.num_experts
    dense_w = jnp.zeros((n, nx), jnp.float32).at[jnp.arange(n)[:, None], idx].add(w).astype(xf.dtype)
    hmid = act(jnp.einsum("ne,xie->nxi", xf, ex["gate_proj"]["weight"].astype(xf.dtype)))
    hmid = hmid * jnp.einsum("ne,xie->nxi", xf, ex["up_proj"]["weight"].astype(xf.dtype))
    return jnp.einsum("nxi,xei,nx->ne", hmid, ex["down_proj"]["weight"].astype(xf.dtype), dense_w)
  if impl not in ("ragged", "tiled"):
    raise ValueError(f"experts_impl must be auto, gather, dense, ragged or tiled, got {impl!r}")
  return _grouped(r, ex, xf, w, idx, impl)


# ragged_dot over rows sorted by expert: rows [M, k] x weights [X, n, k] (contract the weights' last axis) -> [M, n].
_RAGGED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
                                            rhs_group_dimensions=[0])


def _grouped(r: Router, ex: dict, xf: jax.Array, w: jax.Array, idx: jax.Array, impl: str) -> jax.Array:
  """The routed experts as grouped products over the N * K (token, slot) rows sorted by expert (all shapes static).

  Legend: M = N * K rows, T rows per tile, P padded rows (a static bound), G = P / T tiles.
  Each row's output is expert(x) * w in the input dtype (as both references weight an expert's output), summed over
  the K slots in float32 and cast back once.
  """
  act = activation(r.hidden_act)
  n, k = idx.shape
  nx, m = r.num_experts, n * k
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # [M]: rows grouped by expert, tokens in order inside a group
  tok, row_e = order // k, flat[order]
  counts = jnp.bincount(flat, length=nx)  # [X]
  gate, up, down = (ex[name]["weight"] for name in ("gate_proj", "up_proj", "down_proj"))
  if impl == "ragged":
    xs = xf[tok]  # [M, E]
    rd = lambda a, b: jax.lax.ragged_dot_general(a, b.astype(xf.dtype), counts, _RAGGED)
    y = rd(act(rd(xs, gate)) * rd(xs, up), down)  # [M, E]
  else:
    # Each expert's rows padded to whole tiles of T, so every tile is one expert's plain [T, E] x [E, I] products.
    # At most min(X, M) groups are non-empty, each wasting < T rows: P bounds the padded total. Tiles past the
    # used ones are skipped by the cond (the scan's length must be static).
    t = TILE
    p_rows = -(-(m + min(nx, m) * (t - 1)) // t) * t
    padded = (counts + t - 1) // t * t
    pend = jnp.cumsum(padded)  # [X] padded group ends
    dest = (pend - padded)[row_e] + jnp.arange(m) - (jnp.cumsum(counts) - counts)[row_e]  # [M] padded row of each
    src = jnp.full((p_rows,), n, jnp.int32).at[dest].set(tok.astype(jnp.int32))  # [P] token, n = a zero row
    starts = jnp.arange(p_rows // t) * t
    tile_e = jnp.minimum(jnp.searchsorted(pend, starts, side="right"), nx - 1)  # [G]
    xt = jnp.concatenate([xf, jnp.zeros((1, xf.shape[1]), xf.dtype)])[src].reshape(p_rows // t, t, -1)

    def tile(_, item):
      xe, e, used = item

      def run(xe):
        g, u, d = (a[e].astype(xf.dtype) for a in (gate, up, down))
        return (act(xe @ g.T) * (xe @ u.T)) @ d.T

      return None, jax.lax.cond(used, run, jnp.zeros_like, xe)

    _, ys = jax.lax.scan(tile, None, (xt, tile_e, starts < pend[-1]))
    y = ys.reshape(p_rows, -1)[dest]  # [M, E]
  rows = (y * w.reshape(-1)[order].astype(xf.dtype)[:, None]).astype(jnp.float32)
  return jnp.zeros(xf.shape, jnp.float32).at[tok].add(rows).astype(xf.dtype)


def expert_shapes(num_experts: int, width: int, hidden: int, lead: tuple = ()) -> dict:
  """The routed experts' param shapes (gate and experts, no shared experts), with leading axes `lead` (e.g. (L,))."""
  x, i, e = num_experts, width, hidden
  return {"gate": {"weight": lead + (x, e)},
          "experts": {"gate_proj": {"weight": lead + (x, i, e)}, "up_proj": {"weight": lead + (x, i, e)},
                      "down_proj": {"weight": lead + (x, e, i)}}}
