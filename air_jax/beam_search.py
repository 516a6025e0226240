"""Beam search in one compiled `lax.while_loop`, step for step as transformers' (vectorised, 5.x) `_beam_search`.

Shape legend: B examples, K beams (static), W = max(2, 1 + #EOS) * K candidates kept per step, N max new tokens,
V vocab. Beams live in the batch axis of the model (rows b * K + k); the KV cache rows are gathered by the
parents of the surviving beams after each step (a device-side gather, no host round trip).

Per step i (token i of the continuation), as transformers does it:
  scores  = log_softmax(logits) (+ the method's `beam_scores_hook`, e.g. OPERA's penalty) + running beam score
  top W of [K x V] per example -> candidates (parent beam, token); a candidate "hits" when its token is an EOS or
  the length reaches N;
  running beams = the best K candidates that did not hit;
  finished beams = the best K of (previous finished, candidates among the top K that hit, score / len**penalty),
  frozen once the early-stop heuristic says no running beam can beat the worst finished one;
  the loop ends when no example can improve, or every candidate hits.
The result is the best finished beam of each example (transformers' `num_return_sequences=1`).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from air_jax import decoding
from models.family import family_of

NEG = -1.0e9  # transformers' "impossible" score


@flax.struct.dataclass
class BeamState:
  """Arrays of the search (leading [B, K] or [B, W]); `state` is the model's DecodeState over B * K rows."""

  running_tokens: jax.Array  # [B, K, N]
  running_scores: jax.Array  # [B, K]
  finished_tokens: jax.Array  # [B, K, N]
  finished_scores: jax.Array  # [B, K]
  finished_lengths: jax.Array  # [B, K]
  is_finished: jax.Array  # [B, K] bool
  improvable: jax.Array  # [B, 1] bool (transformers' is_early_stop_heuristic_unsatisfied)
  all_hit: jax.Array  # [] bool: every candidate of every example hit a stop at the last step


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, M, ...] gathered along axis 1 by idx [B, J] -> [B, J, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def reorder_cache(config, cache, rows: jax.Array):
  """Gathers the batch rows `rows` [R] of a family's cache (through its `cache_view`) -> a cache of R rows."""
  fam = family_of(config)
  view, batch_axes, _ = fam.cache_view(config, cache)
  return fam.cache_from_view(config, jax.tree.map(lambda x, a: jnp.take(x, rows, axis=a), view, batch_axes))


def _is_eos(tokens, eos_ids):
  hit = jnp.zeros(tokens.shape, bool)
  for e in eos_ids:
    hit = hit | (tokens == e)
  return hit


def beam_step(bs: BeamState, log_probs: jax.Array, i, *, num_beams: int, max_new_tokens: int, eos_ids,
              length_penalty: float, early_stopping: bool | str):
  """One step of the search; log_probs [B * K, V] (already processed). Returns (new BeamState, parents [B, K]).

  early_stopping: True, False or "never", as transformers: True freezes an example once it holds K finished
  beams; False and "never" keep searching while the early-stop heuristic says a running beam may still win, which
  scores the best running beam at the current length (False) or, with length_penalty > 0, at the longest length
  it could reach, N ("never").
  """
  k, n = num_beams, max_new_tokens
  b = bs.running_scores.shape[0]
  v = log_probs.shape[-1]
  w = max(2, 1 + len(eos_ids)) * k
  acc = (log_probs.reshape(b, k, v) + bs.running_scores[:, :, None]).reshape(b, k * v)
  top_scores, top_idx = jax.lax.top_k(acc, w)  # sorted, descending
  parent, token = top_idx // v, (top_idx % v).astype(jnp.int32)
  cand_tokens = _gather(bs.running_tokens, parent)
  cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, token[:, :, None], i, axis=2)
  hits = _is_eos(token, eos_ids) | (i + 1 >= n)

  # Running beams: the best K candidates that did not hit a stop.
  run_scores = top_scores + hits.astype(jnp.float32) * NEG
  _, keep = jax.lax.top_k(run_scores, k)
  running_tokens, running_scores = _gather(cand_tokens, keep), _gather(run_scores, keep)
  parents = _gather(parent, keep)

  # Finished beams: merge the candidates among the top K that just hit a stop.
  just = hits & (jnp.arange(w) < k)[None, :]
  fin = top_scores / ((i + 1.0) ** length_penalty)
  if early_stopping is True:
    fin = fin + (jnp.all(bs.is_finished, axis=-1, keepdims=True)).astype(jnp.float32) * NEG
  fin = fin + (~bs.improvable).astype(jnp.float32) * NEG + (~just).astype(jnp.float32) * NEG
  m_tokens = jnp.concatenate([bs.finished_tokens, cand_tokens], axis=1)
  m_scores = jnp.concatenate([bs.finished_scores, fin], axis=1)
  m_len = jnp.concatenate([bs.finished_lengths, jnp.full((b, w), i + 1, jnp.int32)], axis=1)
  m_done = jnp.concatenate([bs.is_finished, just], axis=1)
  _, best = jax.lax.top_k(m_scores, k)
  finished_scores = _gather(m_scores, best)
  is_finished = _gather(m_done, best)

  # Early-stop heuristic: the best running beam at the current length, or at N for "never" with a positive penalty
  # (a longer hypothesis then divides by more).
  best_len = float(n) if (early_stopping == "never" and length_penalty > 0.0) else i + 1.0
  best_running = running_scores[:, :1] / (best_len ** length_penalty)
  worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
  improvable = bs.improvable & jnp.any(best_running > worst, axis=-1, keepdims=True)
  new = BeamState(running_tokens=running_tokens, running_scores=running_scores,
                  finished_tokens=_gather(m_tokens, best), finished_scores=finished_scores,
                  finished_lengths=_gather(m_len, best), is_finished=is_finished, improvable=improvable,
                  all_hit=jnp.all(hits))
  return new, parents


def _more(bs: BeamState, early_stopping: bool | str):
  open_beam = ~(jnp.all(bs.is_finished) & (early_stopping is True))
  return jnp.any(bs.improvable) & open_beam & ~bs.all_hit


def beam_search_tokens(params, config, input_ids, attention_mask, pixel_values, spec, *, num_beams: int,
                       max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, length_penalty: float = 1.0,
                       early_stopping: bool | str = False,
                       scores_hook: Callable | None = None) -> dict:
  """Beam search over B prompts [B, T]; traceable (jit with the keyword options static).

  scores_hook(log_probs [B*K, V], i, ctx) -> log_probs lets a method (OPERA) edit the step's scores.
  Returns {"tokens": [B, N] (pad after EOS), "num_tokens": [B], "steps": [], "scores": [B] (final beam score)}.
  """
  b = input_ids.shape[0]
  k, n = num_beams, max_new_tokens
  cache_size = input_ids.shape[1] + n
  logits, state, _ = decoding.prefill(params, config, input_ids, attention_mask, pixel_values, spec, cache_size)
  # Every beam of an example starts from the same prompt: prefill once, copy the rows K times.
  rows = jnp.repeat(jnp.arange(b), k)
  state = state.replace(cache=reorder_cache(config, state.cache, rows),
                        key_segments=state.key_segments[rows], next_position=state.next_position[rows])
  logits = logits[rows]
  fill = pad_id
  bs = BeamState(
      running_tokens=jnp.full((b, k, n), fill, jnp.int32),
      running_scores=jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),
      finished_tokens=jnp.full((b, k, n), fill, jnp.int32),
      finished_scores=jnp.full((b, k), NEG, jnp.float32),
      finished_lengths=jnp.zeros((b, k), jnp.int32),
      is_finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool),
      all_hit=jnp.asarray(False))
  step = functools.partial(beam_step, num_beams=k, max_new_tokens=n, eos_ids=eos_ids,
                           length_penalty=length_penalty, early_stopping=early_stopping)

  def advance(i, logits, state, bs):
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if scores_hook is not None:
      log_probs = scores_hook(log_probs, i, state)
    bs, parents = step(bs, log_probs, i)
    flat = (jnp.arange(b)[:, None] * k + parents).reshape(-1)
    state = state.replace(cache=reorder_cache(config, state.cache, flat))
    return bs, state

  bs, state = advance(0, logits, state, bs)

  def cond(carry):
    i, _, bs = carry
    return (i < n) & _more(bs, early_stopping)

  def body(carry):
    i, state, bs = carry
    tokens = jax.lax.dynamic_index_in_dim(bs.running_tokens, i - 1, axis=2, keepdims=False).reshape(-1)
    logits, state, _ = decoding.decode_step(params, config, state, tokens, spec)
    bs, state = advance(i, logits, state, bs)
    return i + 1, state, bs

  steps, _, bs = jax.lax.while_loop(cond, body, (jnp.int32(1), state, bs))
  return {"tokens": bs.finished_tokens[:, 0], "num_tokens": bs.finished_lengths[:, 0], "steps": steps,
          "scores": bs.finished_scores[:, 0]}


_STATIC = ("config", "num_beams", "max_new_tokens", "eos_ids", "pad_id", "length_penalty", "early_stopping")
beam_search_jit = jax.jit(beam_search_tokens, static_argnames=_STATIC)
