"""Gradient screen (attribution patching): a first-order estimate of Delta P_h for every head and scored token.

Scaling head h's output `z` by a gate g (the `head_gate` of the `z` site) and removing the head (g = 0) gives
Delta P_h = P(g = 1) - P(g = 0) ~= dP/dg at g = 1. A backward pass per scored token gives that derivative for
every head at once (the tokens' passes batched):

  current_token: one clean prefill fills the cache; scored slot p is then read by one `decode_step` at write
    index p - 1 that feeds the token at p - 1 without writing the cache (the row attends to the clean cache and
    to its own key/value, exactly the current_token ablation of attribution_core). The gradient of that row's
    P in the gate [L, H] is the token's dP/dg; the P rows run vmapped, `chunk` at a time.
  full_sequence: the gate multiplies `z` at every row of one full decoder pass; token i's derivative is one VJP
    of that pass, mapped over the P scored tokens, `chunk` at a time.

Both see the model only through the family interface (`Family.decoder`, the `head_gate` of the spec at site
`z`), so the screen serves every family.

The estimate is first order: it ranks heads well where removing one head moves P little, and is no substitute
for exact ablation of the heads that matter (`eval.attribute --screen K` runs exact ablation on the top K).

Shape legend: T tokens, P scored positions, L layers, H heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import decoding
from air_jax.attribution_core import _param_dtype, scored_inputs, slot_row
from models.family import family_of, prompt_pieces
from models.spec import RectificationSpec


@functools.partial(jax.jit, static_argnames=("config", "semantics", "chunk"))
def screen_gradients(params, config, input_ids, pixel_values, positions, targets, *,
                     semantics: str = "current_token", chunk: int = 16):
  """(clean log P [P], dP/dg [P, L, H]) for targets at slots `positions` (the token at p - 1 predicts p).

  input_ids [1, T]; pixel_values the family's vision input of one example; `chunk` scored tokens per
  vectorised call (see the module docstring).
  """
  fam = family_of(config)
  dims = config.dims
  nl, nh = dims.num_hidden_layers, dims.num_attention_heads
  dtype = _param_dtype(params, config)
  ones = jnp.ones((nl, nh), dtype)
  mask = jnp.ones_like(input_ids)
  t = input_ids.shape[1]
  batch = min(chunk, positions.shape[0])
  if semantics == "current_token":
    _, state, _ = decoding.prefill(params, config, input_ids, mask, pixel_values, None, cache_size=t)
    state = jax.lax.stop_gradient(state)

    def one(item):
      p, target = item
      st, token = slot_row(state, input_ids, p)

      def prob(g):
        logits, _, _ = decoding.decode_step(params, config, st, token, RectificationSpec(head_gate=g),
                                            write_cache=False)
        logp = jax.nn.log_softmax(logits[0])[target]
        return jnp.exp(logp), logp

      grad, logp = jax.grad(prob, has_aux=True)(ones)
      return logp, grad

    logp, grads = jax.lax.map(one, (positions, targets), batch_size=batch)
    return logp, grads.astype(jnp.float32)
  if semantics != "full_sequence":
    raise ValueError(f"semantics must be current_token or full_sequence, got {semantics!r}")
  embeds, pos, ctx = jax.lax.stop_gradient(prompt_pieces(params, config, input_ids, mask, pixel_values))

  def probs_of(g):
    hidden, _, _ = fam.decoder(params, config, embeds, pos, ctx, spec=RectificationSpec(head_gate=g))
    logits = fam.logits(params, config, hidden[0, positions - 1])
    return jnp.exp(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0])

  probs, vjp = jax.vjp(probs_of, ones)
  eye = jnp.eye(positions.shape[0], dtype=probs.dtype)
  grads = jax.lax.map(lambda e: vjp(e)[0], eye, batch_size=batch)  # [P, L, H]
  return jnp.log(probs), grads.astype(jnp.float32)


def screen_logprobs(params, config, input_ids, pixel_values, positions, *,
                    semantics: str = "current_token", chunk: int = 16, bucket: int = 32,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(clean log P [P] float64, dP/dg [P, L, H] float64) for the tokens at `positions` (see head_logprobs)."""
  if semantics not in ("current_token", "full_sequence"):
    raise ValueError(f"semantics must be current_token or full_sequence, got {semantics!r}")
  params = getattr(params, "params", params)
  ids, pos, pixels, seq, pos_pad = scored_inputs(input_ids, pixel_values, positions, bucket, pad_id)
  n = pos.size
  logp, grad = screen_gradients(params, config, jnp.asarray(seq)[None], pixels, jnp.asarray(pos_pad),
                                jnp.asarray(ids[pos_pad]), semantics=semantics, chunk=chunk)
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
