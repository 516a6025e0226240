"""OPERA's search (Huang et al., CVPR 2024): beam search with an over-trust penalty and retrospection-allocation,
in one compiled `lax.while_loop`, step for step as the official `opera_beam_search` (shikiw/OPERA, transformers
4.29.2 `generation/utils.py`).

Shape legend: K beams (rows of one example), C candidates per beam, N max new tokens (<= window), V vocab,
S = T + N + 1 cache slots (T the bucketed prompt length: slot T + j holds generated token j), B examples.

One loop iteration at position s (s tokens generated on the current path):
  1. candidates: the top C raw logits of each beam; ONE extra read-only decoder pass scores the C x K candidate
     rows (the C candidates of a beam are C query rows at the same slot, each seeing its own key there) and keeps
     the last layer's head-max attention row of each.
  2. local window: rows/columns of the generated tokens only. `hist` [K, N, N] holds the last-layer head-max
     attention row of every fed generated token on the response columns (and `hist_sum` its sum over ALL keys,
     the official row normalisation), reordered with the beams; the candidate row is appended. Column scores
     1e-7 * prod_{r >= j} scale * a[r, j] (stored in float16, as the official code does); the max is the
     over-trust penalty, its column the candidate's roll-back location.
  3. penalty: -(image attention of the candidate row) while s + 1 <= 10, the column-score max afterwards; logits
     are -999 except the C penalised candidates of each beam.
  4. retrospection: mode over candidates (per beam, kept in a history that is NOT reordered with beams) and over
     beams (the location). When every beam's history holds the location more than `threshold` times and the
     location is >= 10, roll back to position P = location + 1 (P - 1 when P already had C roll-backs; none when
     both had), restore the state of position Q = min(P, s - 1) and redo that step without candidate restriction
     and without penalty (logits - (999 + min)), the (beam, token) pairs chosen there before banned (-999).
  5. the transformers-4.29 `BeamSearchScorer` step (or the same scorer with generated-token lengths).

How roll-back restores the cache (cost): beams reorder cache rows every step, so the restored beams' keys and
values may no longer be in the cache. Every step logs the slot it writes (`kvlog`: the response part of the
cache once more, in memory) with the beam parents; a roll-back rebuilds the restored beams' ancestry from the
parent log (a scan over N) and writes their logged keys/values back into the response slots (one gather of the
response cache, no model pass), resets the write index / position, and re-feeds token Q - 1 to get the step's
logits (one ordinary decoding step). The prompt part of the cache is the same in every beam row and is never
touched. The attention history is rebuilt from the logged rows the same way; scorer states are snapshotted per
position (tokens [N, K, N], a few scalars).

Batch: each example runs its own search (the official code runs batch 1; its roll-back test would pool every
example's beams): one example runs as is; several run under `jax.vmap`, each with its own position.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from air_jax import decoding
from air_jax.beam_search import reorder_cache
from models.family import family_of
from models.segments import IMAGE, PAD, TEXT

FILL = -999.0  # the official code's "impossible" logit
WARMUP = 10  # official: image penalty for the first 10 tokens; roll-back locations must be >= 10


@flax.struct.dataclass
class Scorer:
  """transformers-4.29 BeamSearchScorer of one example: running beams and the finished hypotheses."""

  tokens: jax.Array  # [K, N] running beams' generated tokens
  scores: jax.Array  # [K] running beam scores (sum of log-probs)
  hyp_tokens: jax.Array  # [K, N]
  hyp_scores: jax.Array  # [K] normalised scores; unused slots -inf
  hyp_len: jax.Array  # [K] generated tokens (the EOS excluded)
  hyp_eos: jax.Array  # [K] the EOS token that ended it, -1 when it ran to the max length
  n_hyp: jax.Array  # []
  worst: jax.Array  # []
  done: jax.Array  # [] bool


def _is_eos(tokens, eos_ids):
  hit = jnp.zeros(tokens.shape, bool)
  for e in eos_ids:
    hit = hit | (tokens == e)
  return hit


def _add(sc: Scorer, do, tokens, length, eos_tok, score, k: int) -> Scorer:
  """BeamHypotheses.add: keep when not full or better than the worst; when over-full drop the worst."""
  full = sc.n_hyp >= k
  do = do & (~full | (score > sc.worst))
  ext = jnp.concatenate([sc.hyp_scores, score[None]])
  drop = jnp.argmin(jnp.where(jnp.arange(k + 1) < sc.n_hyp, ext, jnp.inf))  # the worst existing one when full
  slot = jnp.where(full, drop, sc.n_hyp)
  scores = sc.hyp_scores.at[slot].set(score)
  worst = jnp.where(full, jnp.min(jnp.where(jnp.arange(k) == slot, jnp.inf, sc.hyp_scores).at[slot].set(score)),
                    jnp.minimum(score, sc.worst))
  put = lambda x, v: jnp.where(do, x.at[slot].set(v), x)
  return sc.replace(hyp_tokens=put(sc.hyp_tokens, tokens), hyp_scores=jnp.where(do, scores, sc.hyp_scores),
                    hyp_len=put(sc.hyp_len, length), hyp_eos=put(sc.hyp_eos, eos_tok),
                    n_hyp=sc.n_hyp + (do & ~full).astype(jnp.int32), worst=jnp.where(do, worst, sc.worst))


def scorer_init(k: int, n: int, pad_id: int) -> Scorer:
  return Scorer(tokens=jnp.full((k, n), pad_id, jnp.int32),
                scores=jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32),
                hyp_tokens=jnp.full((k, n), pad_id, jnp.int32), hyp_scores=jnp.full((k,), -jnp.inf, jnp.float32),
                hyp_len=jnp.zeros((k,), jnp.int32), hyp_eos=jnp.full((k,), -1, jnp.int32),
                n_hyp=jnp.int32(0), worst=jnp.float32(1e9), done=jnp.asarray(False))


def scorer_step(sc: Scorer, log_probs, pos, off, length_penalty, *, k: int, eos_ids, early_stopping: bool):
  """BeamSearchScorer.process on log_probs [K, V] at position pos -> (Scorer, parents [K], tokens [K]).

  off + pos is the length a hypothesis ending here is normalised by (the whole sequence without the EOS in 4.29).
  """
  v = log_probs.shape[-1]
  top_s, top_i = jax.lax.top_k((log_probs + sc.scores[:, None]).reshape(-1), 2 * k)
  parent, token = top_i // v, (top_i % v).astype(jnp.int32)
  eos = _is_eos(token, eos_ids)
  slot = jnp.cumsum(~eos) - 1
  sel = jnp.argmax((~eos)[None, :] & (slot[None, :] == jnp.arange(k)[:, None]), axis=-1)  # [K] ranks
  parents, tokens = parent[sel], token[sel]
  new_tokens = sc.tokens[parents].at[:, pos].set(tokens)
  cur_len = (off + pos).astype(jnp.float32)
  denom = cur_len ** length_penalty
  out = sc
  for r in range(k):  # EOS among the top K ranks: a finished hypothesis (the EOS itself is not part of it)
    out = _add(out, eos[r], sc.tokens[parent[r]], pos, token[r], top_s[r] / denom, k)
  heuristic = jnp.asarray(True) if early_stopping else out.worst >= top_s[0] / denom
  done = sc.done | ((out.n_hyp >= k) & heuristic)
  return out.replace(tokens=new_tokens, scores=top_s[sel], done=done), parents, tokens


def scorer_finalize(sc: Scorer, fin_len, length_penalty, *, k: int, n: int, pad_id: int):
  """BeamSearchScorer.finalize: add the running beams (unless done), pick the best -> (tokens [N], num [])."""
  out = sc
  denom = fin_len.astype(jnp.float32) ** length_penalty
  for r in range(k):
    out = _add(out, ~sc.done, sc.tokens[r], jnp.int32(n), jnp.int32(-1), sc.scores[r] / denom, k)
  best = jnp.argmax(jnp.where(jnp.arange(k) < out.n_hyp, out.hyp_scores, -jnp.inf))
  length, eos = out.hyp_len[best], out.hyp_eos[best]
  col = jnp.arange(n)
  tokens = jnp.where(col < length, out.hyp_tokens[best], pad_id)
  tokens = jnp.where((col == length) & (eos >= 0), eos, tokens)
  return tokens, length + (eos >= 0).astype(jnp.int32)


def _mode(x, size: int):
  """torch.mode over the last axis of int x [..., M] in [0, size): the most frequent, smallest on ties."""
  counts = jnp.sum(x[..., None] == jnp.arange(size), axis=-2)
  return jnp.argmax(counts, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class Carry:
  pos: jax.Array  # [] tokens generated on the current path
  redo: jax.Array  # [] bool: this step is a roll-back redo
  ban_pos: jax.Array  # [] the roll-back position P whose bans the redo applies
  logits: jax.Array  # [K, V] of the step at `pos`
  dec: decoding.DecodeState  # K rows
  sc: Scorer
  snaps: Scorer  # leading [N + 1]: the scorer at the start of each position
  hist: jax.Array  # [K, N, N] response-column attention of each fed generated token (rows 0 .. pos-1)
  hist_sum: jax.Array  # [K, N]
  locs: jax.Array  # [K, N] per-position mode of the candidates' roll-back locations (not reordered)
  rb_cnt: jax.Array  # [N + 2] roll-backs per position
  ban_beam: jax.Array  # [N + 2, C * K]
  ban_tok: jax.Array  # [N + 2, C * K]
  ban_n: jax.Array  # [N + 2]
  kvlog: dict  # the cache view's leaves (Family.cache_view) with the slot axis removed and a leading [N]: the
  # slot each token wrote
  attnlog: jax.Array  # [N, K, N]
  sumlog: jax.Array  # [N, K]
  parentlog: jax.Array  # [N, K] beam parents chosen at each position
  toklog: jax.Array  # [N, K] tokens chosen at each position
  rollbacks: jax.Array  # [] roll-backs done
  iters: jax.Array  # [] loop iterations


def _search_one(params, config, logits0, dec0, off, fin_len, values, *, k, c, n, t, eos_ids, pad_id,
                early_stopping):
  """The search of ONE example: logits0 [1, V] and dec0 (one row) from the prefill -> (tokens [N], num, stats)."""
  fam = family_of(config)
  rows = jnp.zeros((k,), jnp.int32)
  dec0 = dec0.replace(cache=reorder_cache(config, dec0.cache, rows), key_segments=dec0.key_segments[rows],
                      next_position=dec0.next_position[rows])
  np0 = dec0.next_position
  image = dec0.key_segments == IMAGE  # [K, S]
  r = jnp.arange(n)
  scale, threshold = values.scale_factor, jnp.floor(values.threshold)
  weight, lp = values.penalty_weight, values.length_penalty

  def feed(dec, tokens):
    """Feeds tokens [K] at the write slot -> (logits [K, V], dec, last-layer head-max row [K, S])."""
    w = dec.write_index
    segs = jax.lax.dynamic_update_slice(dec.key_segments, jnp.full((k, 1), TEXT, jnp.int32), (0, w))
    ctx = decoding.decode_context(segs, w)
    hidden, cache, extras = fam.decoder(params, config, fam.embed_tokens(params, config, tokens[:, None]),
                                        fam.decode_positions(config, dec.next_position), ctx, spec=None,
                                        cache=dec.cache, write_index=w, output_attentions=True)
    logits = fam.logits(params, config, hidden[:, 0]).astype(jnp.float32)
    row = jnp.max(extras["attentions"][-1][:, :, 0, :], axis=1)
    dec = decoding.DecodeState(cache=cache, key_segments=segs, next_position=dec.next_position + 1,
                               write_index=w + 1)
    return logits, dec, row

  def candidate_rows(dec, cand):
    """Read-only pass of cand [K, C] (C query rows per beam at the write slot) -> head-max rows [K, C, S]."""
    w = dec.write_index
    segs = jax.lax.dynamic_update_slice(dec.key_segments, jnp.full((k, 1), TEXT, jnp.int32), (0, w))
    ctx = decoding.decode_context(segs, w)
    pos = jnp.repeat(fam.decode_positions(config, dec.next_position), c, axis=-1)
    _, _, extras = fam.decoder(params, config, fam.embed_tokens(params, config, cand), pos, ctx, spec=None,
                               cache=dec.cache, write_index=w, output_attentions=True, cache_write=False)
    return jnp.max(extras["attentions"][-1], axis=1)

  def log_feed(cy: Carry, dec, tokens):
    logits, dec, row = feed(dec, tokens)
    j = dec.write_index - 1 - t
    cols, total = row[:, t:t + n], row.sum(-1)
    view, _, slot_axes = fam.cache_view(config, dec.cache)
    kvlog = jax.tree.map(lambda lg, x, a: lg.at[j].set(jax.lax.dynamic_index_in_dim(x, t + j, a, False)),
                         cy.kvlog, view, slot_axes)
    return cy.replace(logits=logits, dec=dec, kvlog=kvlog, attnlog=cy.attnlog.at[j].set(cols),
                      sumlog=cy.sumlog.at[j].set(total), hist=cy.hist.at[:, j].set(cols),
                      hist_sum=cy.hist_sum.at[:, j].set(total))

  def body(cy: Carry) -> Carry:
    s, logits = cy.pos, cy.logits
    # 1-3: candidates, over-trust scores, penalty.
    cand_s, cand_t = jax.lax.top_k(logits, c)  # [K, C]
    att = candidate_rows(cy.dec, cand_t)  # [K, C, S]
    a_sum = att.sum(-1)
    mh = cy.hist / cy.hist_sum[..., None]  # [K, N, N] (rows >= s unused)
    mc = att[:, :, t:t + n] / a_sum[..., None]  # [K, C, N]
    local = jnp.where((r < s)[:, None], mh[:, None], jnp.where((r == s)[:, None], mc[:, :, None, :], 1.0))
    local = scale * local  # [K, C, N rows, N cols]
    local = jnp.where((r[:, None] >= r[None, :]) & (r <= s)[:, None], local, 1.0)
    col = (1e-7 * jnp.prod(local, axis=-2)).astype(jnp.float16)  # [K, C, N], float16 as the official scores
    col = jnp.where(r <= s, col, -jnp.inf)
    rb_scores, rb_locs = jnp.max(col, -1), jnp.argmax(col, -1).astype(jnp.int32)
    attn_i = jnp.sum(jnp.where(image[:, None], att / a_sum[..., None], 0.0), -1)  # [K, C]
    late = (weight * rb_scores.astype(jnp.float32)).astype(jnp.float16).astype(jnp.float32)
    cand_pen = cand_s - jnp.where(s + 1 <= WARMUP, weight * -attn_i, late)
    per_beam = _mode(rb_locs, n)  # [K]
    loc = _mode(per_beam, n)
    # 4: retrospection test (normal steps only).
    locs = cy.locs.at[:, s].set(per_beam)
    hits = jnp.sum((locs == loc) & (r <= s), -1)
    want = ~cy.redo & jnp.all(hits > threshold) & (loc >= WARMUP)
    p0 = loc + 1
    full0 = cy.rb_cnt[p0] >= c
    p = jnp.where(full0, p0 - 1, p0)
    fire = want & ~(full0 & (cy.rb_cnt[p] >= c))
    q = jnp.minimum(p, s - 1)
    # 5: the processed logits of this step and the scorer.
    normal = jnp.full(logits.shape, FILL, jnp.float32).at[jnp.arange(k)[:, None], cand_t].set(cand_pen)
    redo = logits - (999.0 + jnp.min(logits, -1, keepdims=True))
    live = jnp.arange(c * k) < cy.ban_n[cy.ban_pos]
    redo = redo.at[jnp.where(live, cy.ban_beam[cy.ban_pos], k), cy.ban_tok[cy.ban_pos]].set(FILL, mode="drop")
    proc = jnp.where(cy.redo, redo, normal)
    sc, parents, tokens = scorer_step(cy.sc, jax.nn.log_softmax(proc, -1), s, off, lp, k=k, eos_ids=eos_ids,
                                      early_stopping=early_stopping)

    def advance(cy):
      cy = cy.replace(pos=s + 1, redo=jnp.asarray(False), sc=sc,
                      snaps=jax.tree.map(lambda a, x: a.at[s + 1].set(x), cy.snaps, sc),
                      locs=jnp.where(cy.redo, cy.locs, locs), parentlog=cy.parentlog.at[s].set(parents),
                      toklog=cy.toklog.at[s].set(tokens), hist=cy.hist[parents], hist_sum=cy.hist_sum[parents])
      return cy, cy.dec.replace(cache=reorder_cache(config, cy.dec.cache, parents)), tokens

    def roll_back(cy):
      def step(a, j):  # ancestry of the beams of position q: rows of position j's log
        on = j <= q - 1
        a_j = jnp.where(on, a, jnp.arange(k))
        return jnp.where(on, cy.parentlog[j][a_j], jnp.arange(k)), a_j

      _, anc = jax.lax.scan(step, jnp.arange(k), jnp.arange(n)[::-1])
      anc = anc[::-1]  # [N, K]

      def restore(x, lg, a, sa):  # x a view leaf, batch axis a and slot axis sa; lg [N, view without slot]
        g = jax.vmap(lambda l, i: jnp.take(l, i, axis=a if a < sa else a - 1))(lg, anc)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.moveaxis(g, 0, sa).astype(x.dtype), t, axis=sa)

      keep = (r < q - 1)[None, :]
      hist = jnp.where(keep[..., None], jnp.swapaxes(jax.vmap(lambda l, i: l[i])(cy.attnlog, anc), 0, 1), 0.0)
      hist_sum = jnp.where(keep, jax.vmap(lambda l, i: l[i])(cy.sumlog, anc).T, 0.0)
      sq = jax.tree.map(lambda x: x[q], cy.snaps)
      view, batch_axes, slot_axes = fam.cache_view(config, cy.dec.cache)
      restored = fam.cache_from_view(config, jax.tree.map(restore, view, cy.kvlog, batch_axes, slot_axes))
      dec = cy.dec.replace(cache=restored, write_index=t + q - 1,
                           next_position=np0 + q - 1)
      ban_beam = jax.lax.dynamic_update_slice(cy.ban_beam, cy.parentlog[q][None], (p, cy.ban_n[p]))
      ban_tok = jax.lax.dynamic_update_slice(cy.ban_tok, cy.toklog[q][None], (p, cy.ban_n[p]))
      ban_n = cy.ban_n.at[p].add(k).at[p + 1].set(0)
      cy = cy.replace(pos=q, redo=jnp.asarray(True), ban_pos=p, sc=sq, hist=hist, hist_sum=hist_sum,
                      rb_cnt=cy.rb_cnt.at[p].add(1), ban_beam=ban_beam, ban_tok=ban_tok, ban_n=ban_n,
                      rollbacks=cy.rollbacks + 1)
      return cy, dec, sq.tokens[:, q - 1]

    # Only the bookkeeping is branched; the one decoding step per iteration runs after it (under vmap a cond
    # runs both branches).
    cy, dec, feed_tokens = jax.lax.cond(fire, roll_back, advance, cy)
    return log_feed(cy, dec, feed_tokens).replace(iters=cy.iters + 1)

  sc0 = scorer_init(k, n, pad_id)
  view0, _, slot_axes0 = fam.cache_view(config, dec0.cache)
  kvlog = jax.tree.map(lambda x, a: jnp.zeros((n,) + x.shape[:a] + x.shape[a + 1:], x.dtype), view0, slot_axes0)
  cy = Carry(pos=jnp.int32(0), redo=jnp.asarray(False), ban_pos=jnp.int32(0), logits=logits0[rows].astype(jnp.float32),
             dec=dec0, sc=sc0, snaps=jax.tree.map(lambda x: jnp.broadcast_to(x, (n + 1,) + x.shape), sc0),
             hist=jnp.zeros((k, n, n), jnp.float32), hist_sum=jnp.zeros((k, n), jnp.float32),
             locs=jnp.zeros((k, n), jnp.int32), rb_cnt=jnp.zeros((n + 2,), jnp.int32),
             ban_beam=jnp.zeros((n + 2, c * k), jnp.int32), ban_tok=jnp.zeros((n + 2, c * k), jnp.int32),
             ban_n=jnp.zeros((n + 2,), jnp.int32), kvlog=kvlog, attnlog=jnp.zeros((n, k, n), jnp.float32),
             sumlog=jnp.zeros((n, k), jnp.float32), parentlog=jnp.zeros((n, k), jnp.int32),
             toklog=jnp.zeros((n, k), jnp.int32), rollbacks=jnp.int32(0), iters=jnp.int32(0))
  cy = jax.lax.while_loop(lambda cy: (cy.pos < n) & ~cy.sc.done, body, cy)
  tokens, num = scorer_finalize(cy.sc, fin_len, lp, k=k, n=n, pad_id=pad_id)
  return tokens, num, cy.rollbacks, cy.iters


def opera_search(params, config, input_ids, attention_mask, pixel_values, values, *, num_beams: int,
                 num_candidates: int, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                 early_stopping: bool = False) -> dict:
  """OPERA over B prompts [B, T]; traceable (jit with the keyword options static).

  values: OperaValues (scale_factor, threshold, penalty_weight, length_penalty, official arrays). official 1:
  transformers 4.29's normalisation (a hypothesis is divided by its whole length, prompt included, the image
  counted as ONE token as in the official LLaVA code's input ids); 0: transformers 5.x's (by its generated
  tokens, the EOS included; max-length hypotheses by N).
  Returns {"tokens": [B, N], "num_tokens": [B], "rollbacks": [B], "iterations": [B]}.
  """
  b, t = input_ids.shape
  k, c, n = num_beams, num_candidates, max_new_tokens
  logits, state, _ = decoding.prefill(params, config, input_ids, attention_mask, pixel_values, None, t + n + 1)
  segs = state.key_segments[:, :t]
  real = jnp.sum(segs != PAD, -1)
  img = segs == IMAGE
  runs = jnp.sum(img & ~jnp.pad(img, ((0, 0), (1, 0)))[:, :-1], -1)
  official = (real - jnp.sum(img, -1) + runs).astype(jnp.int32)  # the prompt as the official LLaVA ids count it
  whole = values.official.astype(bool)  # traced: both normalisations share one compilation
  off = jnp.where(whole, official, 1)
  fin = jnp.where(whole, official + n, n)
  one = functools.partial(_search_one, params, config, values=values, k=k, c=c, n=n, t=t, eos_ids=eos_ids,
                          pad_id=pad_id, early_stopping=early_stopping)
  fam = family_of(config)
  view, axes, _ = fam.cache_view(config, state.cache)
  if b == 1:
    tokens, num, rb, it = one(logits, state, off[0], fin[0])
    tokens, num, rb, it = tokens[None], num[None], rb[None], it[None]
  else:
    split = lambda x, a: x.reshape(x.shape[:a] + (b, 1) + x.shape[a + 1:])
    st = decoding.DecodeState(cache=jax.tree.map(split, view, axes), key_segments=split(state.key_segments, 0),
                              next_position=split(state.next_position, 0), write_index=state.write_index)
    in_axes = decoding.DecodeState(cache=axes, key_segments=0, next_position=0, write_index=None)
    # Each vmapped item sees a one-row cache view; back to the family's cache layout before the search.
    tokens, num, rb, it = jax.vmap(
        lambda lg, s, o, f: one(lg, s.replace(cache=fam.cache_from_view(config, s.cache)), o, f),
        in_axes=(0, in_axes, 0, 0))(split(logits, 0), st, off, fin)
  return {"tokens": tokens, "num_tokens": num, "rollbacks": rb, "iterations": it}


_STATIC = ("config", "num_beams", "num_candidates", "max_new_tokens", "eos_ids", "pad_id", "early_stopping")
opera_search_jit = jax.jit(opera_search, static_argnames=_STATIC)
