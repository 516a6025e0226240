"""KV-cached decoding: prefill, one decoding step, and a whole generation as one `lax.while_loop`.

Shape legend: B batch, T prompt length (bucketed, left padded), N max new tokens, S = T + N cache slots,
L layers, H heads, V vocab.

The cache lives in a `DecodeState` pytree that each step returns (the jitted step donates it), never mutated in
place. Slot s of the cache holds the token at column s of [prompt | generated]; key segment ids per slot mark
padding and unwritten slots (PAD), so the attention mask and the AIR segments come from one array.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from models.family import family_of, prompt_pieces
from models.segments import PAD, TEXT
from models.spec import AttnContext


@flax.struct.dataclass
class DecodeState:
  """Everything a decoding step needs besides params.

  cache: the family's cache pytree (Llama: {"k", "v"} [L, B, S, K, D], or per layer [B*K, D, S], see
    models.llama.init_cache; searches reach its rows through `Family.cache_view`);
  key_segments [B, S] int32; next_position [B] int32 (position offset of the next token; the family's
  decode_positions turns it into RoPE positions); write_index [] int32 (the slot the next token goes to).
  """

  cache: dict
  key_segments: jax.Array
  next_position: jax.Array
  write_index: jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static sampling mode. Values (temperature, top_k, top_p) are traced arrays so sweeps do not recompile.

  greedy: argmax (the other values are ignored). Otherwise: logits / temperature, then top-k (k <= 0: off) and
  top-p (p >= 1: off) filtering, then a categorical draw from a key folded with the step number.
  """

  greedy: bool = True


def prefill(params, config, input_ids, attention_mask, pixel_values, spec, cache_size: int,
            output_stats: bool = False, early_exit: tuple | None = None):
  """Runs the prompt [B, T] and returns (last-row logits [B, V], DecodeState, extras).

  Any registered family (models.family): `pixel_values` is the family's vision input (an array or a dict of
  arrays, as `Family.prepare_inputs` makes it), `config` selects the family.
  early_exit: optional static (layers, final_norm): extras then hold `exit_logits` [K, B, V], the last row's
  logits read out after each of the K layers (`Family.exit_logits`).
  """
  fam = family_of(config)
  b, t = input_ids.shape
  embeds, positions, ctx = prompt_pieces(params, config, input_ids, attention_mask, pixel_values,
                                         key_slots=cache_size)
  cache = fam.init_cache(params, config, b, cache_size, embeds.dtype)
  kw = {"output_hidden_layers": early_exit[0]} if early_exit else {}
  hidden, cache, extras = fam.decoder(params, config, embeds, positions, ctx, spec=spec, cache=cache, write_index=0,
                                      output_stats=output_stats, **kw)
  logits = fam.logits(params, config, hidden[:, -1])
  extras = _exit_logits(params, config, extras, early_exit)
  state = DecodeState(cache=cache, key_segments=ctx.key_segments,
                      next_position=fam.next_position(config, positions, attention_mask),
                      write_index=jnp.asarray(t, jnp.int32))
  return logits, state, extras


def decode_context(key_segments: jax.Array, write_index: jax.Array) -> AttnContext:
  """AttnContext of one decoding row written at `write_index` (its segment already set in key_segments)."""
  b, s = key_segments.shape
  visible = (key_segments != PAD) & (jnp.arange(s) <= write_index)[None, :]
  return AttnContext(key_segments=key_segments, query_segments=jnp.full((b, 1), TEXT, jnp.int32),
                     mask=visible[:, None, :], query_slot=write_index[None], prefill=False)


def _exit_logits(params, config, extras: dict, early_exit) -> dict:
  """Replaces extras["hidden_states"] [K, B, T, E] by `exit_logits` [K, B, V] of the last row."""
  if not early_exit:
    return extras
  extras = dict(extras)
  hs = extras.pop("hidden_states")[:, :, -1]
  extras["exit_logits"] = family_of(config).exit_logits(params, config, hs, early_exit[1])
  return extras


def decode_step(params, config, state: DecodeState, tokens: jax.Array, spec,
                output_stats: bool = False, write_cache: bool = True, early_exit: tuple | None = None):
  """Feeds tokens [B] at the next slot; returns (logits [B, V], new DecodeState, extras).

  write_cache=False scores the row without writing the cache (the returned state keeps the old cache): under
  `jax.vmap` over specs the cache then stays shared instead of being copied per item (head attribution).
  """
  fam = family_of(config)
  b = tokens.shape[0]
  key_segments = jax.lax.dynamic_update_slice(state.key_segments, jnp.full((b, 1), TEXT, jnp.int32),
                                              (0, state.write_index))
  ctx = decode_context(key_segments, state.write_index)
  embeds = fam.embed_tokens(params, config, tokens[:, None])
  positions = fam.decode_positions(config, state.next_position)
  kw = {"output_hidden_layers": early_exit[0]} if early_exit else {}
  hidden, cache, extras = fam.decoder(params, config, embeds, positions, ctx, spec=spec, cache=state.cache,
                                      write_index=state.write_index, output_stats=output_stats,
                                      cache_write=write_cache, **kw)
  logits = fam.logits(params, config, hidden[:, 0])
  extras = _exit_logits(params, config, extras, early_exit)
  new = DecodeState(cache=cache, key_segments=key_segments, next_position=state.next_position + 1,
                    write_index=state.write_index + 1)
  return logits, new, extras


def warp_logits(logits, temperature, top_k, top_p):
  """logits [B, V] -> the logits sampling draws from: temperature, then top-k, then top-p, as transformers'
  warpers in that order (removed tokens get -inf). top_k <= 0 and top_p >= 1 remove nothing."""
  logits = logits / jnp.maximum(temperature, 1e-6)
  v = logits.shape[-1]
  desc = jnp.sort(logits, axis=-1)[:, ::-1]
  # top-k: keep logits >= the k-th largest (k <= 0 disables).
  k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
  kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  # top-p as transformers' TopPLogitsWarper: sort ascending (stable: tied tokens keep index order), drop the
  # tokens whose cumulative mass from the bottom is <= 1 - p, never the top one. Summing from the small end and
  # deciding by rank (not by value) matters: top_p = 1 then drops nothing that has mass, and of tokens tied at the
  # cut-off only as many are kept as the prefix needs.
  order = jnp.argsort(logits, axis=-1)  # [B, V] ascending
  asc = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
  drop = (cum <= 1.0 - top_p) & (jnp.arange(v) < v - 1) & (top_p < 1.0)  # p >= 1: no warper, as transformers
  rows = jnp.arange(logits.shape[0])[:, None]
  drop = jnp.zeros_like(drop).at[rows, order].set(drop)
  return jnp.where(drop, -jnp.inf, logits)


def sample_token(logits, sampling: Sampling, key, temperature, top_k, top_p):
  """Next tokens [B] from logits [B, V]."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = warp_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class SamplingValues:
  key: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def make(cls, seed_or_key=0, temperature=1.0, top_k=0, top_p=1.0):
    key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
    return cls(key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def _is_eos(tokens, eos_ids: tuple[int, ...]):
  out = jnp.zeros(tokens.shape, bool)
  for e in eos_ids:
    out = out | (tokens == e)
  return out


class _Stepper:
  """What the loop does with a compiled method, whichever it is: views in, one logits row per example out.

  The loop only calls these; every method-specific decision lives in the method's plan (air_jax.methods.base).
  """

  def __init__(self, method, config, batch: int):
    from air_jax.methods.base import as_compiled

    self.method = as_compiled(method, config)
    self.plan, self.values = self.method.plan, self.method.values
    self.config, self.b, self.v = config, batch, self.plan.num_views
    layers = tuple(self.plan.early_exit_layers)
    self.early_exit = (layers, bool(self.plan.early_exit_norm)) if layers else None

  def inputs(self, input_ids, attention_mask, pixel_values):
    from air_jax.methods.base import ViewInputs

    base = ViewInputs(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    views = self.plan.views(self.values, base, self.config)
    rows = views.input_ids.shape[0]
    if rows != self.v * self.b:
      raise ValueError(f"{type(self.plan).__name__}.views returned {rows} rows; expected num_views x batch = "
                       f"{self.v} x {self.b}")
    return base, views

  def spec(self):
    return self.plan.spec(self.values, self.b, self.config)

  def combine(self, logits, extras, mstate):
    """logits [V*B, vocab] of every row -> combined [B, vocab] (float32)."""
    per_view = logits.reshape(self.v, self.b, logits.shape[-1])
    exits = extras.get("exit_logits")
    if exits is not None:
      exits = exits[:, : self.b]  # early exits of the main view
    return self.plan.combine(self.values, per_view, exits, mstate).astype(jnp.float32)

  def main_rows(self, extras):
    """Attention statistics of the main view only."""
    if "segment_mass" in extras:
      extras = dict(extras, segment_mass=extras["segment_mass"][:, : self.b])
    return extras

  def tile(self, tok):
    """The chosen tokens [B] fed to every view's rows [V*B]."""
    return jnp.tile(tok, self.v) if self.v > 1 else tok


def generate_tokens(params, config, input_ids, attention_mask, pixel_values, method,
                    sampling_values: SamplingValues, *, max_new_tokens: int, sampling: Sampling = Sampling(),
                    eos_ids: tuple[int, ...] = (), pad_id: int = 0, output_scores: bool = False,
                    output_stats: bool = False) -> dict:
  """The whole generation (prefill + `lax.while_loop` over steps). Traceable; jit it with static options.

  `method` is a compiled decoding method (`air_jax.methods.CompiledMethod`), a bare `RectificationSpec` or None
  (plain decoding). The method's views run as extra batch rows of the same prefill and decoding steps; its
  combiner turns their logits (and early exits) into the one logits row the sampler sees.

  Returns {"tokens": [B, N] (pad_id after EOS), "num_tokens": [B] (EOS included), "steps": []} plus
  "scores" [B, N, V] (float32 logits the sampler saw at each step) and "segment_mass" [N, L, B, H, 3] (main
  view) when asked. Rows stop independently at an EOS; the loop ends when every row has stopped or N tokens are
  out.
  """
  b = input_ids.shape[0]
  n = max_new_tokens
  cache_size = input_ids.shape[1] + n
  sv = sampling_values
  st = _Stepper(method, config, b)
  base, views = st.inputs(input_ids, attention_mask, pixel_values)
  spec = st.spec()
  logits, state, extras = prefill(params, config, views.input_ids, views.attention_mask, views.pixel_values, spec,
                                  cache_size, output_stats, early_exit=st.early_exit)
  extras = st.main_rows(extras)
  mstate = st.plan.init_state(st.values, base, config)
  nl, nh = config.dims.num_hidden_layers, config.dims.num_attention_heads
  buf = {
      "tokens": jnp.full((b, n), pad_id, jnp.int32),
      "done": jnp.zeros((b,), bool),
      "num_tokens": jnp.zeros((b,), jnp.int32),
  }
  if output_scores:
    buf["scores"] = jnp.zeros((b, n, logits.shape[-1]), jnp.float32)
  if output_stats:
    buf["segment_mass"] = jnp.zeros((n, nl, b, nh, 3), jnp.float32).at[0].set(extras["segment_mass"])

  def emit(i, logits, extras, mstate, buf):
    logits = st.combine(logits, extras, mstate)
    tok = sample_token(logits, sampling, jax.random.fold_in(sv.key, i), sv.temperature, sv.top_k, sv.top_p)
    tok = jnp.where(buf["done"], pad_id, tok)
    new = dict(buf)
    new["tokens"] = jax.lax.dynamic_update_slice(buf["tokens"], tok[:, None], (0, i))
    new["num_tokens"] = buf["num_tokens"] + (~buf["done"]).astype(jnp.int32)
    new["done"] = buf["done"] | _is_eos(tok, eos_ids)
    if output_scores:
      new["scores"] = jax.lax.dynamic_update_slice(buf["scores"], logits[:, None], (0, i, 0))
    return tok, st.plan.update_state(st.values, mstate, tok), new

  tok, mstate, buf = emit(0, logits, extras, mstate, buf)

  def cond(carry):
    i, _, _, _, buf = carry
    return (i < n) & ~jnp.all(buf["done"])

  def body(carry):
    i, tok, state, mstate, buf = carry
    logits, state, extras = decode_step(params, config, state, st.tile(tok), spec, output_stats,
                                        early_exit=st.early_exit)
    extras = st.main_rows(extras)
    if output_stats:
      buf = dict(buf, segment_mass=jax.lax.dynamic_update_index_in_dim(buf["segment_mass"],
                                                                         extras["segment_mass"], i, 0))
    tok, mstate, buf = emit(i, logits, extras, mstate, buf)
    return i + 1, tok, state, mstate, buf

  steps, _, _, _, buf = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, state, mstate, buf))
  out = {"tokens": buf["tokens"], "num_tokens": buf["num_tokens"], "steps": steps}
  for k in ("scores", "segment_mass"):
    if k in buf:
      out[k] = buf[k]
  return out


_STATIC = ("config", "max_new_tokens", "sampling", "eos_ids", "pad_id", "output_scores", "output_stats")
TRACE_COUNT = {"generate": 0}


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_tokens_jit(params, config, input_ids, attention_mask, pixel_values, method, sampling_values, **kw):
  TRACE_COUNT["generate"] += 1  # runs only while tracing: counts compilations
  return generate_tokens(params, config, input_ids, attention_mask, pixel_values, method, sampling_values, **kw)


prefill_jit = jax.jit(prefill, static_argnames=("config", "cache_size", "output_stats", "early_exit"))
decode_step_jit = jax.jit(decode_step, static_argnames=("config", "output_stats", "early_exit"),
                          donate_argnames=("state",))


def generate_tokens_debug(params, config, input_ids, attention_mask, pixel_values, method, sampling_values, *,
                          max_new_tokens: int, sampling: Sampling = Sampling(), eos_ids=(), pad_id: int = 0,
                          output_scores: bool = False, output_stats: bool = False) -> dict:
  """Same result as `generate_tokens`, as a Python loop over the jitted step (inspectable between steps)."""
  import numpy as np

  n = max_new_tokens
  cache_size = input_ids.shape[1] + n
  sv = sampling_values
  b = input_ids.shape[0]
  st = _Stepper(method, config, b)
  base, views = st.inputs(input_ids, attention_mask, pixel_values)
  spec = st.spec()
  logits, state, extras = prefill_jit(params, config, views.input_ids, views.attention_mask, views.pixel_values,
                                      spec, cache_size, output_stats, early_exit=st.early_exit)
  mstate = st.plan.init_state(st.values, base, config)
  tokens = np.full((b, n), pad_id, np.int32)
  done = np.zeros(b, bool)
  num = np.zeros(b, np.int32)
  scores, stats = [], []
  steps, tok = 0, None
  for i in range(n):
    if i > 0:
      logits, state, extras = decode_step_jit(params, config, state, st.tile(jnp.asarray(tok)), spec, output_stats,
                                              early_exit=st.early_exit)
    extras = st.main_rows(extras)
    logits = st.combine(logits, extras, mstate)
    tok = np.asarray(sample_token(logits, sampling, jax.random.fold_in(sv.key, i), sv.temperature, sv.top_k,
                                  sv.top_p))
    tok = np.where(done, pad_id, tok)
    mstate = st.plan.update_state(st.values, mstate, jnp.asarray(tok))
    tokens[:, i] = tok
    num += ~done
    done |= np.isin(tok, eos_ids)
    scores.append(np.asarray(logits))
    if output_stats:
      stats.append(np.asarray(extras["segment_mass"]))
    steps = i + 1
    if done.all():
      break
  out = {"tokens": tokens, "num_tokens": num, "steps": steps}
  if output_scores:
    pad = np.zeros((b, n - steps, scores[0].shape[-1]), np.float32)
    out["scores"] = np.concatenate([np.stack(scores, 1), pad], 1)
  if output_stats:
    st_ = np.stack(stats, 0)
    out["segment_mass"] = np.concatenate([st_, np.zeros((n - steps,) + st_.shape[1:], np.float32)], 0)
  return out
