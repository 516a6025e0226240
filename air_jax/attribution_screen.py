"""Gradient screen (attribution patching): a first-order estimate of Delta P_h for every head and scored token.

Scaling head h's output `z` by a gate g (the `head_gate` of the `z` site) and removing the head (g = 0) gives
Delta P_h = P(g = 1) - P(g = 0) ~= dP/dg at g = 1. One backward pass gives that derivative for every head:

  current_token: the gate is per row (g[l, t, h]) and a row's keys/values reach other rows without gradient
    (the forward values are untouched), so d(sum_i P_i) / d g[l, p_i - 1, h] is exactly d P_i / d g of the
    current_token ablation of token i alone: its row changes, including its own keys/values above l, while
    every other row stays clean. One forward, one backward.
  full_sequence: the gate is shared by every row; token i's derivative needs its own backward pass (the VJP is
    mapped over the P scored tokens, `chunk` at a time).

The estimate is first order: it ranks heads well where removing one head moves P little, and is no substitute
for exact ablation of the heads that matter (`eval.attribute --screen K` runs exact ablation on the top K).

Shape legend: T tokens, P scored positions, L layers, H heads, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from air_jax.attribution_reuse import _target_logprob
from models import llama_parts as lp
from models import rope
from models.attention import NEG
from models.config import LlavaConfig
from models.layers import rms_norm
from models.family import family_of


def _own_row_attention(q, k, v, isolate: bool):
  """Causal attention q [1, T, H, D], k/v [1, T, K, D]; with `isolate`, row t's k/v carry gradient to row t only.

  Forward values are those of plain causal attention: the isolated form adds (x - stop_gradient(x)) = 0 terms.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  scale = jnp.asarray(d**-0.5, q.dtype)
  k_in, v_in = (jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)) if isolate else (k, v)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_in) * scale
  diag = jnp.eye(t, dtype=bool)
  if isolate:  # the diagonal with the row's own k (value unchanged, gradient restored)
    own = jnp.einsum("btkgd,btkd->bkgt", qg, k - k_in) * scale
    scores = scores + jnp.where(diag, own[..., None], 0.0)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores.astype(jnp.float32), NEG)
  pattern = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  z = jnp.einsum("bkgts,bskd->btkgd", pattern, v_in)
  if isolate:
    self_w = jnp.diagonal(pattern, axis1=-2, axis2=-1)  # [B, K, G, T]: each row's weight on itself
    z = z + jnp.einsum("bkgt,btkd->btkgd", self_w, v - v_in)
  return z.reshape(b, t, h, d)


def _gated_logprobs(params, config: LlavaConfig, embeds, rows, targets, gates, isolate: bool):
  """log P(targets) [P] at rows with gates [L, T, H] on z (per row) or [L, H] (every row)."""
  cfg = config.text
  lm = params["language_model"]
  x = embeds
  t = x.shape[1]
  cos, sin = rope.cos_sin(cfg, jnp.arange(t, dtype=jnp.int32)[None], x.dtype)
  for li in range(cfg.num_hidden_layers):
    p = lp.layer_params(lm["layers"], li)
    y = lp.input_norm(cfg, p, x)
    k, v = lp.project_kv(cfg, p, y, cos, sin)
    z = _own_row_attention(lp.project_q(cfg, p, y, cos, sin), k, v, isolate)
    g = gates[li] if gates.ndim == 3 else jnp.broadcast_to(gates[li], (t, gates.shape[-1]))
    z = z * g.astype(z.dtype)[None, :, :, None]
    x = lp.mlp_residual(cfg, p, lp.attention_output(cfg, p, x, z))
  hidden = rms_norm(lm["norm"], x[0, rows], cfg.rms_norm_eps)
  return _target_logprob(lm, params.get("lm_head"), hidden, targets)


@functools.partial(jax.jit, static_argnames=("config", "semantics", "chunk"))
def screen_gradients(params, config: LlavaConfig, input_ids, pixel_values, positions, targets, weights, *,
                     semantics: str = "current_token", chunk: int = 16):
  """(clean log P [P], dP/dg [P, L, H]) for targets at slots `positions` (the token at p - 1 predicts p).

  weights [P]: 1 for each distinct real position, 0 for padding (current_token sums weighted P over rows; two
  entries at one slot must share their weight, e.g. 1/2 each).
  """
  cfg = config.text
  nl, nh = cfg.num_hidden_layers, cfg.num_attention_heads
  rows = (positions - 1).astype(jnp.int32)
  embeds = jax.lax.stop_gradient(
      family_of(config).embed(params, config, input_ids, jnp.ones_like(input_ids), pixel_values))
  t = embeds.shape[1]
  dtype = embeds.dtype
  if semantics == "current_token":
    def total(g):
      logp = _gated_logprobs(params, config, embeds, rows, targets, g, isolate=True)
      return jnp.sum(weights * jnp.exp(logp)), logp

    grad, logp = jax.grad(total, has_aux=True)(jnp.ones((nl, t, nh), dtype))
    return logp, jnp.transpose(grad[:, rows], (1, 0, 2)).astype(jnp.float32)  # [P, L, H]
  if semantics != "full_sequence":
    raise ValueError(f"semantics must be current_token or full_sequence, got {semantics!r}")
  f = lambda g: jnp.exp(_gated_logprobs(params, config, embeds, rows, targets, g, isolate=False))
  probs, vjp = jax.vjp(f, jnp.ones((nl, nh), dtype))
  eye = jnp.eye(positions.shape[0], dtype=probs.dtype)
  grads = jax.lax.map(lambda e: vjp(e)[0], eye, batch_size=min(chunk, positions.shape[0]))  # [P, L, H]
  return jnp.log(probs), grads.astype(jnp.float32)


def screen_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, *,
                    semantics: str = "current_token", chunk: int = 16, bucket: int = 32,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(clean log P [P] float64, dP/dg [P, L, H] float64) for the tokens at `positions` (see head_logprobs)."""
  from air_jax.attribution_core import scored_inputs

  params = getattr(params, "params", params)
  fam = family_of(config)
  if not fam.supports_layer_reuse(config):
    raise ValueError(f"the gradient screen reads the decoder layer by layer as a plain Llama stack; the {fam.name} "
                     "family's decoder is not one (run exact ablation: eval.attribute without --screen)")
  ids, pos, pixels, seq, pos_pad = scored_inputs(input_ids, pixel_values, positions, bucket, pad_id)
  n, cap = pos.size, pos_pad.size
  tgt = ids[pos_pad]
  _, inverse, counts = np.unique(pos, return_inverse=True, return_counts=True)
  weights = np.zeros(cap, np.float32)
  weights[:n] = 1.0 / counts[inverse]
  logp, grad = screen_gradients(params, config, jnp.asarray(seq)[None], pixels, jnp.asarray(pos_pad),
                                jnp.asarray(tgt), jnp.asarray(weights), semantics=semantics, chunk=chunk)
  return np.asarray(logp, np.float64)[:n], np.asarray(grad, np.float64)[:n]


def screen_deltas(clean_logp: np.ndarray, grad: np.ndarray, score: str = "prob") -> np.ndarray:
  """First-order Delta P_h [P, L, H] from clean log P [P] and dP/dg [P, L, H] (scores as delta_scores).

  prob: dP/dg; abs: |dP/dg|; logprob: d log P / dg = (dP/dg) / P.
  """
  grad = np.asarray(grad, np.float64)
  if score == "prob":
    return grad
  if score == "abs":
    return np.abs(grad)
  if score == "logprob":
    return grad / np.exp(np.asarray(clean_logp, np.float64))[:, None, None]
  raise ValueError(f"score must be one of ('prob', 'abs', 'logprob'), got {score!r}")
