"""Log-probabilities of target tokens with every attention head ablated in turn.

`head_logprobs` runs by default `air_jax.attribution_reuse`, which reuses the clean run below the ablated layer
(much faster, equal within float rounding). The plain vmapped reference below (`reuse=False`, and any subset
of heads) reruns the whole model per ablation:

Head h is ablated by zeroing its slice of the input of `o_proj`: `RectificationSpec.head_gate[l, h] = 0`.
Instead of one forward per head, all L*H one-hot gates (plus the all-ones clean gate) are vmapped, `chunk`
ablations per vectorised call: `jax.lax.map(..., batch_size=chunk)` over gates (full_sequence), or a loop over
chunks of (gate, position) items with a dynamic trip count (current_token), so that one compiled graph serves
any number of scored positions up to a power-of-two capacity.

Two semantics:
  current_token (the official AD-HH tool): the head is removed only in the row that predicts the target; the
    keys/values of earlier tokens come from the clean run. One clean prefill of [prompt | caption] fills the
    cache once; target slot p is then scored by one read-only `decode_step` at write_index = p - 1 that feeds the
    token at slot p - 1 with the ablation gate. Reusing the full cache is exact: slots > p - 1 are masked and
    slot p - 1 is replaced by the ablated row's own K/V, as the official re-forward does.
  full_sequence (the definition of Delta P): the head is removed at every position (one full forward per gate;
    the image features are computed once and shared).

Memory: current_token decodes with a read-only cache (`decode_step(write_cache=False)`), so the clean cache is
shared by all `chunk` parallel ablations and each holds only its own row; full_sequence holds the activations
of the whole sequence per parallel ablation. Lower `chunk` to fit.
Only the scored rows go through `lm_head`.

Shape legend: T tokens (prompt + caption), P scored positions, G gates (1 + L*H), L layers, H heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import attribution_reuse, decoding
from models.config import LlavaConfig
from models.family import family_of, prompt_pieces
from models.spec import RectificationSpec

SEMANTICS = ("current_token", "full_sequence")
SCORES = ("prob", "abs", "logprob")


def ablation_gate(index: jax.Array, num_layers: int, num_heads: int, dtype=jnp.float32) -> jax.Array:
  """Gate [L, H]: ones with head `index` (flat, layer * H + head) zeroed; index -1 zeroes none (clean run)."""
  flat = 1.0 - jax.nn.one_hot(index, num_layers * num_heads, dtype=dtype)  # one_hot(-1) is all zeros
  return flat.reshape(num_layers, num_heads)


def _param_dtype(params, config) -> jnp.dtype:
  return jax.tree.leaves(params[family_of(config).decoder_path])[0].dtype


def slot_row(state: decoding.DecodeState, input_ids, p):
  """(state, token [1]) of a decoding step that re-reads slot p - 1 of a clean cache prefilled with input_ids
  [1, T]: the step feeds the token at p - 1 at write index p - 1 (with write_cache=False it attends to the cache's
  slots < p - 1 and to its own key/value), and its logits predict slot p."""
  t = input_ids.shape[1]
  # Text after the last image advances the position offset by one per slot (1-D and multimodal RoPE alike), so
  # slot p - 1 sits t - (p - 1) steps before the offset prefill left for slot t.
  st = state.replace(write_index=(p - 1).astype(jnp.int32),
                     next_position=(state.next_position - (t - (p - 1))).astype(jnp.int32))
  return st, jax.lax.dynamic_slice_in_dim(input_ids[0], p - 1, 1)


def _target_logprob(params, config, hidden, targets):
  logits = family_of(config).logits(params, config, hidden)  # [..., V] float32
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def current_token_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, targets, item_gate,
                           item_pos, num_items, chunk: int):
  """log P(targets[i] | prefix) with gate g applied in the row of slot positions[i] - 1 only.

  Work items are (gate, position) pairs; `chunk` of them run per vectorised call, in a loop whose trip count
  is dynamic, so the compiled graph depends only on the sequence length and the buffer sizes.

  Args:
    params: model params dict.
    config: static LlavaConfig.
    input_ids: [1, T] int32, no left padding (right padding beyond the last scored slot is harmless).
    pixel_values: [1, C, H, W].
    positions: [P] int32 target slots, 1 <= p <= T (the token at p - 1 is fed).
    targets: [P] int32 token ids to score.
    item_gate: [M] int32 flat head id of each item (-1: clean); M a multiple of chunk.
    item_pos: [M] int32 index into positions of each item.
    num_items: [] int32, items to compute (the rest of the [M] buffers is padding).
    chunk: items per vectorised call.

  Returns:
    [M] float32 log-probabilities (items >= num_items are left at 0).
  """
  nl, nh = config.dims.num_hidden_layers, config.dims.num_attention_heads
  t = input_ids.shape[1]
  mask = jnp.ones_like(input_ids)
  _, state, _ = decoding.prefill(params, config, input_ids, mask, pixel_values, None, cache_size=t)
  dtype = _param_dtype(params, config)

  def one(g, i):
    p = positions[i]
    spec = RectificationSpec(head_gate=ablation_gate(g, nl, nh, dtype))
    st, token = slot_row(state, input_ids, p)
    logits, _, _ = decoding.decode_step(params, config, st, token, spec, write_cache=False)
    return jax.nn.log_softmax(logits[0])[targets[i]]

  def body(c, out):
    g = jax.lax.dynamic_slice_in_dim(item_gate, c * chunk, chunk)
    i = jax.lax.dynamic_slice_in_dim(item_pos, c * chunk, chunk)
    return jax.lax.dynamic_update_slice_in_dim(out, jax.vmap(one)(g, i), c * chunk, axis=0)

  steps = (num_items + chunk - 1) // chunk
  return jax.lax.fori_loop(0, steps, body, jnp.zeros(item_gate.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def full_sequence_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, targets, gates,
                           chunk: int):
  """log P(targets[i] | prefix) with gate g applied at every position; same arguments as current_token."""
  nl, nh = config.dims.num_hidden_layers, config.dims.num_attention_heads
  mask = jnp.ones_like(input_ids)
  # vision tower once, shared by every gate
  embeds, pos, ctx = prompt_pieces(params, config, input_ids, mask, pixel_values)
  fam = family_of(config)
  dtype = _param_dtype(params, config)

  def one(g):
    spec = RectificationSpec(head_gate=ablation_gate(g, nl, nh, dtype))
    hidden, _, _ = fam.decoder(params, config, embeds, pos, ctx, spec=spec)
    return _target_logprob(params, config, hidden[0, positions - 1], targets)

  return jax.lax.map(one, gates, batch_size=chunk)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m if m > 0 else n


def scored_inputs(input_ids, pixel_values, positions, bucket: int, pad_id: int):
  """Checked, bucketed inputs of a scoring run (head attribution, gradient screen).

  Returns (ids [T], positions [P], pixels, seq [T'] (cut after the last scored row, right-padded with pad_id to a
  multiple of `bucket`: later rows never matter), positions padded to a power of two [P'] by repeating the last
  one (few compiled shapes)).
  """
  ids = np.asarray(input_ids, np.int32).reshape(-1)
  pos = np.asarray(positions, np.int32).reshape(-1)
  t = ids.shape[0]
  if pos.size == 0:
    raise ValueError("no positions to score")
  if pos.min() < 1 or pos.max() >= t:
    raise ValueError(f"positions must lie in [1, {t - 1}] (the sequence has {t} tokens), got {pos.tolist()}")
  pixels = jax.tree.map(jnp.asarray, pixel_values)
  if isinstance(pixels, jax.Array) and pixels.ndim == 3:
    pixels = pixels[None]
  need = int(pos.max())
  length = max(_round_up(need, bucket), need)
  seq = np.full(length, pad_id, np.int32)
  seq[: min(length, t)] = ids[:length]
  cap = 1 << (pos.size - 1).bit_length()
  pos_pad = np.concatenate([pos, np.full(cap - pos.size, pos[-1], np.int32)])
  return ids, pos, pixels, seq, pos_pad


def _staged(fn, how, *args, **kwargs):
  """`fn` (a jitted function) traced (how == "trace") or lowered, not run."""
  return fn.trace(*args, **kwargs) if how == "trace" else fn.lower(*args, **kwargs)


def head_logprobs(params, config: LlavaConfig, input_ids, pixel_values, positions, *,
                  semantics: str = "current_token", chunk: int = 256, bucket: int = 32,
                  pad_id: int = 0, lower: bool | str = False, reuse: bool = True,
                  heads=None) -> tuple[np.ndarray, np.ndarray]:
  """Clean and ablated log-probabilities of the tokens at `positions`, for every head.

  Args:
    params: model params dict (or a LoadedModel: its `.params`).
    config: the LlavaConfig.
    input_ids: [T] or [1, T] ids of prompt + caption (no padding).
    pixel_values: [1, C, H, W] (or [C, H, W]), or the family's vision input of one example.
    positions: slots p (1 <= p < T) whose token input_ids[p] is scored given input_ids[:p].
    semantics: "current_token" or "full_sequence" (see the module docstring).
    chunk: ablations per vectorised call (bounds memory).
    bucket: the sequence is cut after the last needed slot and padded to a multiple of this (fewer compiles).
    pad_id: id used for right padding (never attended to by a scored row).
    lower: True: return the `jax.stages.Lowered` computation instead of running it (to time compilation);
      "trace": the `jax.stages.Traced` one (its jaxpr, e.g. to count its FLOPs).
    reuse: reuse the clean run below the ablated layer (`attribution_reuse`, default); False reruns the whole
      model per ablation (the plain vmapped reference).
    heads: optional flat head ids (layer * H + head) to ablate, the others are left NaN (a screened subset;
      runs the plain vmapped path, whose cost is proportional to the number of heads).

  Returns:
    (clean [P] float64, ablated [P, L, H] float64) log-probabilities.
  """
  if semantics not in SEMANTICS:
    raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  params = getattr(params, "params", params)
  ids, pos, pixels, seq, pos_pad = scored_inputs(input_ids, pixel_values, positions, bucket, pad_id)
  n, cap = pos.size, pos_pad.size
  tgt_pad = ids[pos_pad]
  nl, nh = config.dims.num_hidden_layers, config.dims.num_attention_heads
  gate_ids = np.arange(-1, nl * nh, dtype=np.int32)
  if heads is not None:
    chosen = np.unique(np.asarray(heads, np.int64).reshape(-1))
    if chosen.size and (chosen.min() < 0 or chosen.max() >= nl * nh):
      raise ValueError(f"heads must be flat ids in [0, {nl * nh - 1}] (layer * {nh} + head), got {chosen.tolist()}")
    gate_ids = np.concatenate([[-1], chosen]).astype(np.int32)
    reuse = False
  num_gates = gate_ids.size
  chunk = min(chunk, num_gates * cap)
  args = (params, config, jnp.asarray(seq)[None], pixels, jnp.asarray(pos_pad), jnp.asarray(tgt_pad))
  reuse = reuse and family_of(config).supports_layer_reuse(config)
  if reuse and semantics == "current_token":
    # Positions per group: about `chunk` rows at the last layer; a power of two, so it divides cap.
    group = 1 << (max(1, min(cap, chunk // (nl * nh))).bit_length() - 1)
    call = (*args, jnp.int32(n))
    if lower:
      return _staged(attribution_reuse.current_token_logprobs, lower, *call, group=group)
    out = np.asarray(attribution_reuse.current_token_logprobs(*call, group=group), np.float64)[:n].T
  elif reuse:
    if lower:
      return _staged(attribution_reuse.full_sequence_logprobs, lower, *args, chunk=chunk)
    out = np.asarray(attribution_reuse.full_sequence_logprobs(*args, chunk=chunk), np.float64)[:n].T
  elif semantics == "current_token":
    # Items gate-major: (gate -1, every position), (head 0, every position), ...; only the first n_items run.
    n_items = num_gates * n
    # Even chunks: e.g. 129 items at chunk 64 run as 3 x 43, not 64 + 64 + a 64-wide call for one item.
    chunk = -(-n_items // -(-n_items // chunk))
    size = _round_up(num_gates * cap, chunk)
    item_gate = np.full(size, -1, np.int32)
    item_pos = np.zeros(size, np.int32)
    item_gate[:n_items] = np.repeat(gate_ids, n)
    item_pos[:n_items] = np.tile(np.arange(n, dtype=np.int32), num_gates)
    call = (*args, jnp.asarray(item_gate), jnp.asarray(item_pos), jnp.int32(n_items))
    if lower:
      return _staged(current_token_logprobs, lower, *call, chunk=chunk)
    out = current_token_logprobs(*call, chunk=chunk)
    out = np.asarray(out, np.float64)[:n_items].reshape(num_gates, n)
  else:
    gates = jnp.asarray(gate_ids)
    if lower:
      return _staged(full_sequence_logprobs, lower, *args, gates, chunk=min(chunk, num_gates))
    out = np.asarray(full_sequence_logprobs(*args, gates, chunk=min(chunk, num_gates)), np.float64)[:, :n]
  clean = out[0]
  if heads is not None:
    full = np.full((nl * nh, n), np.nan)
    full[gate_ids[1:]] = out[1:]
    out = np.concatenate([out[:1], full])
  ablated = out[1:].T.reshape(n, nl, nh)
  return clean, ablated


def delta_scores(clean_logp: np.ndarray, ablated_logp: np.ndarray, score: str = "prob") -> np.ndarray:
  """Delta P_h per position: clean [P] and ablated [P, L, H] log-probs -> [P, L, H].

  prob: P_M - P_{M without h} (the definition); abs: its absolute value; logprob: log P_M - log P_{M without h}.
  (The official tool's `prob_diff`, `abs_prob_diff` and `log_prob_diff`.)
  """
  clean = np.asarray(clean_logp, np.float64)[:, None, None]
  ablated = np.asarray(ablated_logp, np.float64)
  if score == "prob":
    return np.exp(clean) - np.exp(ablated)
  if score == "abs":
    return np.abs(np.exp(clean) - np.exp(ablated))
  if score == "logprob":
    return clean - ablated
  raise ValueError(f"score must be one of {SCORES}, got {score!r}")
