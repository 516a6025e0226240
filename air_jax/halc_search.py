"""HALC's search (Chen et al., ICML 2024): greedy decoding whose object words are re-decided by a focal contrast
of fields of view around the word's detector box. See air_jax.methods.halc for the method and its sources.

Shape legend: B examples, T prompt length (bucketed, left padded), N max new tokens, S = T + N + extra cache
slots, n fields of view, m pairs, V vocab.

How it runs (the compiled parts and the one host round trip):
  1. prefill + a compiled `lax.while_loop` of greedy steps over the batch. A token that starts a new word
     (`WordTables`: a "▁"/"Ġ" piece, punctuation, a special token, or any token after one of those) completes
     the previous word; the loop
     stops when a row completes a word whose first token may begin an object word (`WordTables.maybe`, a superset
     computed once from the CHAIR vocabulary) at a position not decided yet.
  2. host: the word is decoded and looked up in the CHAIR vocabulary (singular form, as the metric does). For an
     object word: the detector (any `air_jax.detectors.Detector`) runs on the image the model sees (the main
     pixel array, un-normalised); its boxes above the threshold are filtered as the official code does (area
     below `min_box_area` dropped, IoU above `box_iou` with a kept box: the same instance), the smallest one is
     kept (none: the official fallback box; more than `max_boxes`: the word is left as it is), and n FOV boxes
     grow around it.
  3. compiled: ONE batched forward of the n FOV views of just the examples with an object word (their count
     padded to a power of two, the generated prefix to a multiple of 32): the prompt with the FOV's pixels
     (`Family.map_pixels` + crop-and-resize of the pixel array, so no family branches) followed by the tokens
     generated before the word; JSD of every pair, the top m pairs contrasted both ways -> 2m candidates.
  4. host: one candidate is chosen (selection "top": the first, i.e. the most divergent pair with the larger FOV
     as the focal view; "matching": the best text-image score of a `scorer`). When it differs from the word's
     first token, the row is rewound to the word: the candidate replaces it and the rest is discarded.
  5. back to 1 until every row has N tokens or an EOS.

Rewinding a row costs O(1) and touches no cache entry: the cache slot index is shared by the batch and only
moves forward; the discarded tokens' slots are marked PAD in that row's key segments (invisible from then on)
and the row's RoPE position is reset. A row therefore uses one slot per token it ever fed; `extra` slots beyond
T + N absorb the discarded ones (a row that runs out of slots ends early; `truncated` reports it). Every row's
result depends only on its own history, so a batch equals its rows run alone.
"""

from __future__ import annotations

import dataclasses
import functools
import string
import warnings
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from air_jax import decoding, fov
from models.family import family_of, prompt_pieces
from models.segments import PAD

_PUNCT = string.punctuation + "“”‘’"


# -- words ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WordTables:
  """Per token id [V] bool: `lead` the piece carries a word marker ("▁", "Ġ"); `sep` it spells no letter or
  digit (punctuation, a bare marker, special tokens, ids beyond the tokenizer): a word of its own; `maybe` its
  text may begin an object word of the vocabulary (a superset, checked exactly on the host).

  Words: a token starts a new word when it leads, is a separator, or follows a separator (`starts_word`).
  """

  lead: np.ndarray
  sep: np.ndarray
  maybe: np.ndarray


def _piece_text(piece: str) -> tuple[bool, str]:
  """(leading word marker, text) of a tokenizer piece (SentencePiece "▁", byte-level BPE "Ġ")."""
  lead = piece[:1] in ("▁", "Ġ")
  return lead, piece.lstrip("▁Ġ").replace("▁", " ").replace("Ġ", " ")


def object_forms(vocab) -> tuple[str, ...]:
  """The single-word entries of a CHAIR vocabulary (lower case): the words a caption token may spell."""
  return tuple(sorted({e.lower() for line in vocab.synonyms for e in line if e and " " not in e.strip()}))


def word_tables(tokenizer, vocab, vocab_size: int) -> WordTables:
  """The word tables of a tokenizer and a CHAIR vocabulary."""
  forms = object_forms(vocab)
  special = set(getattr(tokenizer, "all_special_ids", []) or [])
  pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
  lead = np.zeros(vocab_size, bool)
  sep = np.ones(vocab_size, bool)
  maybe = np.zeros(vocab_size, bool)
  for i, piece in enumerate(pieces):
    if piece is None or i in special:
      continue
    lead[i], text = _piece_text(piece)
    sep[i] = not any(ch.isalnum() for ch in text)
    t = text.strip().strip(_PUNCT).lower()
    if not sep[i] and t:
      maybe[i] = any(f.startswith(t) or t.startswith(f) for f in forms)
  return WordTables(lead=lead, sep=sep, maybe=maybe)


def starts_word(tables: WordTables, token: int, prev: int | None) -> bool:
  """Whether `token` (after `prev`, None at the first position) begins a new word."""
  return bool(tables.lead[token] or tables.sep[token] or prev is None or tables.sep[prev])


def object_word(text: str, vocab) -> str | None:
  """The singular query word when `text` (one caption word) names an object of `vocab`, else None."""
  from eval.chair_metric import singularize

  word = text.strip().strip(_PUNCT).lower()
  if not word or " " in word:
    return None
  single = singularize(word)
  return single if vocab.category_of(single) is not None else None


# -- images -----------------------------------------------------------------------------------------------------


def pixel_image(config, vision, row: int, mean, std):
  """The image (PIL, RGB) the model sees in example `row`: its main pixel array [.., C, H, W] un-normalised.

  For tiled inputs the first tile is taken. Raises a ValueError for vision inputs that are not pixel arrays.
  """
  from PIL import Image

  grabbed = []

  def grab(pix):
    grabbed.append(pix)
    return pix

  one = jax.tree.map(lambda x: np.asarray(x[row:row + 1]), vision)
  family_of(config).map_pixels(config, one, grab)
  pix = np.asarray(grabbed[0], np.float32)
  check_pixel_layout(pix.shape, config)
  pix = pix.reshape((-1,) + pix.shape[-3:])[0]
  mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
  std = np.asarray(std, np.float32).reshape(-1, 1, 1)
  rgb = np.clip(np.round((pix * std + mean) * np.float32(255.0)), 0, 255).astype(np.uint8)
  if rgb.shape[0] == 1:
    rgb = np.repeat(rgb, 3, 0)
  return Image.fromarray(np.ascontiguousarray(np.moveaxis(rgb, 0, -1)))


def check_pixel_layout(shape, config) -> None:
  """Batch-first pixel arrays [B, (tiles,) C, H, W] only (not e.g. flattened patch rows [B, P, D])."""
  if len(shape) < 4 or shape[-3] not in (1, 3) or shape[-1] < 2 or shape[-2] < 2:
    raise ValueError(f"HALC crops pixel arrays [..., C, H, W]; the {family_of(config).name} family's vision input "
                     f"has pixel arrays of shape {tuple(shape)} (e.g. flattened patches), which cannot be cropped")


def image_stats(processor) -> tuple[Any, Any]:
  ip = getattr(processor, "image_processor", None)
  mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
  if mean is None or std is None:
    raise ValueError("HALC needs the processor's image_mean and image_std to show the detector the image the "
                     "model sees; the model's image processor has none")
  return mean, std


def _iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def instance_boxes(detection, size, min_area: float = 0.01, max_iou: float = 0.6) -> np.ndarray:
  """The detection's boxes as the official `extract_detection` keeps them: normalised by the image `size` (W, H),
  clipped to [0, 1], rounded to 3 decimals; a box whose area is below `min_area` is dropped (too small an object),
  and so is one whose IoU with a box kept before it exceeds `max_iou` (the same instance). Detector order."""
  boxes = np.asarray(detection.boxes, np.float64).reshape(-1, 4)
  w, h = size
  boxes = np.around(np.clip(boxes / np.array([w, h, w, h], np.float64), 0.0, 1.0), 3)
  kept = []
  for b in boxes:
    if (b[2] - b[0]) * (b[3] - b[1]) < min_area:
      continue
    if any(_iou(b, k) > max_iou for k in kept):
      continue
    kept.append(b)
  return np.asarray(kept, np.float64).reshape(-1, 4)


def target_box(detection, size, max_boxes: int | None, min_area: float = 0.01, max_iou: float = 0.6):
  """(normalised box or None when skipped, status) from one Detection on an image of `size` (W, H): the
  instances of `instance_boxes`; more than `max_boxes`: skipped; none: the fallback box; else the smallest."""
  boxes = instance_boxes(detection, size, min_area, max_iou)
  if max_boxes is not None and len(boxes) > max_boxes:
    return None, "skipped"
  if len(boxes) == 0:
    return fov.FALLBACK_BOX, "not-detected"
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return tuple(boxes[int(np.argmin(area))]), "detected"  # the smallest box, the first on ties (official)


# -- compiled pieces --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Loop:
  dec: decoding.DecodeState
  tok: jax.Array  # [B] token fed next (the last emitted one)
  tokens: jax.Array  # [B, N] emitted tokens (pad after the end)
  count: jax.Array  # [B] tokens emitted
  done: jax.Array  # [B] bool
  word_start: jax.Array  # [B] position of the current word's first token
  decided: jax.Array  # [B] positions below this are final (re-decided words are not checked again)
  event: jax.Array  # [B] bool: a candidate object word was completed at the last emission
  ev_start: jax.Array  # [B] its first position
  slot_of: jax.Array  # [B, N] cache slot each position's token was fed at (-1: not fed)


def _is_eos(tokens, eos_ids):
  hit = jnp.zeros(tokens.shape, bool)
  for e in eos_ids:
    hit = hit | (tokens == e)
  return hit


def _emit(loop: Loop, y, tables, n: int, eos_ids, pad_id: int) -> Loop:
  """Records the greedy tokens y [B] of the live rows and flags completed candidate object words."""
  lead, sep, maybe = tables
  b = y.shape[0]
  rows = jnp.arange(b)
  live = ~loop.done
  q, p = loop.count, loop.word_start
  first = loop.tokens[rows, jnp.clip(p, 0, n - 1)]
  prev = loop.tokens[rows, jnp.clip(q - 1, 0, n - 1)]
  starts = lead[y] | sep[y] | (q == 0) | sep[prev]
  ev = live & starts & (q > p) & (p >= loop.decided) & maybe[first]
  tokens = loop.tokens.at[rows, jnp.where(live, q, n)].set(y, mode="drop")
  count = loop.count + live.astype(jnp.int32)
  done = loop.done | (live & (_is_eos(y, eos_ids) | (count >= n)))
  return loop.replace(tokens=tokens, count=count, done=done, tok=jnp.where(live, y, pad_id),
                      word_start=jnp.where(live & starts, q, p), event=ev, ev_start=jnp.where(ev, p, loop.ev_start))


def start(params, config, input_ids, attention_mask, pixel_values, tables, *, n: int, cache_size: int,
          eos_ids, pad_id: int) -> Loop:
  """Prefill and the first greedy token."""
  b = input_ids.shape[0]
  logits, dec, _ = decoding.prefill(params, config, input_ids, attention_mask, pixel_values, None, cache_size)
  z = jnp.zeros((b,), jnp.int32)
  loop = Loop(dec=dec, tok=z, tokens=jnp.full((b, n), pad_id, jnp.int32), count=z, done=jnp.zeros((b,), bool),
              word_start=z, decided=z, event=jnp.zeros((b,), bool), ev_start=z,
              slot_of=jnp.full((b, n), -1, jnp.int32))
  return _emit(loop, jnp.argmax(logits, -1).astype(jnp.int32), tables, n, eos_ids, pad_id)


def run(params, config, loop: Loop, tables, *, n: int, eos_ids, pad_id: int) -> Loop:
  """Greedy steps until every row is done, the slots run out, or a row completes a candidate object word."""
  cache_size = loop.dec.key_segments.shape[1]
  rows = jnp.arange(loop.tok.shape[0])
  loop = loop.replace(event=jnp.zeros_like(loop.event))

  def cond(lp):
    return (lp.dec.write_index < cache_size) & jnp.any(~lp.done) & ~jnp.any(lp.event)

  def body(lp):
    live = ~lp.done
    slot_of = lp.slot_of.at[rows, jnp.where(live, lp.count - 1, n)].set(lp.dec.write_index, mode="drop")
    logits, dec, _ = decoding.decode_step(params, config, lp.dec, lp.tok, None)
    y = jnp.argmax(logits, -1).astype(jnp.int32)
    return _emit(lp.replace(dec=dec, slot_of=slot_of), y, tables, n, eos_ids, pad_id)

  return jax.lax.while_loop(cond, body, loop)


def fov_candidates(params, config, input_ids, attention_mask, tokens, upto, pixel_values, boxes, alpha, beta, *,
                   num_pairs: int, jsd_mode: str, contrast_mode: str) -> dict:
  """The FOV views of B examples in one forward -> candidates (see air_jax.fov.candidates) per example.

  Example b is conditioned on its prompt and tokens[b, :upto[b]] and sees the n crops boxes[b] [n, 4] of its
  pixel arrays, each resampled to the full size. Returns {"tokens": [B, 2m], "final", "base", "jsd": [B, P]}.
  """
  fam = family_of(config)
  b, t = input_ids.shape
  nn, nf = tokens.shape[1], boxes.shape[1]
  seq = jnp.concatenate([input_ids, tokens], 1)
  valid = jnp.concatenate([attention_mask.astype(jnp.int32),
                           (jnp.arange(nn)[None, :] < upto[:, None]).astype(jnp.int32)], 1)
  # left-pack: the prompt's real tokens and the kept generated ones end at the last column
  src = (jnp.arange(t + nn)[None, :] - (nn - upto)[:, None]) % (t + nn)
  seq = jnp.take_along_axis(seq, src, 1)
  valid = jnp.take_along_axis(valid, src, 1)
  rows = jnp.repeat(jnp.arange(b), nf)
  seq, valid = seq[rows], valid[rows]
  flat = boxes.reshape(-1, 4)
  vision = jax.tree.map(lambda x: x[rows], pixel_values)
  vision = fam.map_pixels(config, vision, lambda pix: jax.vmap(fov.crop_resize)(pix, flat))
  embeds, positions, ctx = prompt_pieces(params, config, seq, valid, vision)
  hidden, _, _ = fam.decoder(params, config, embeds, positions, ctx, spec=None)
  logits = fam.logits(params, config, hidden[:, -1]).astype(jnp.float32).reshape(b, nf, -1)
  one = functools.partial(fov.candidates, num_pairs=num_pairs, alpha=alpha, beta=beta, jsd_mode=jsd_mode,
                          contrast_mode=contrast_mode)
  out = jax.vmap(one)(logits)
  out["logits"] = logits
  return out


start_jit = jax.jit(start, static_argnames=("config", "n", "cache_size", "eos_ids", "pad_id"))
run_jit = jax.jit(run, static_argnames=("config", "n", "eos_ids", "pad_id"), donate_argnames=("loop",))
fov_candidates_jit = jax.jit(fov_candidates, static_argnames=("config", "num_pairs", "jsd_mode", "contrast_mode"))


# -- the driver -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
  """What the driver needs from a HALC config (see air_jax.methods.halc.HALCConfig)."""

  num_fovs: int
  expand_ratio: float
  box_threshold: float
  num_pairs: int
  max_boxes: int | None
  min_box_area: float
  box_iou: float
  jsd: str
  contrast: str
  selection: str
  extra_slots: int  # -1: max_new_tokens


def halc_search(params, config, input_ids, attention_mask, pixel_values, values, *, settings: Settings, detector,
                scorer, vocab, processor, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                trace: list | None = None) -> dict:
  """HALC over B prompts (see the module docstring). `values`: HalcValues (alpha, beta arrays).

  trace: when a list, one dict per object word checked (row, position, word, status, box, candidates, chosen).
  Returns {"tokens": [B, N], "num_tokens": [B], "corrections": [B], "checked": [B], "truncated": [B]} (numpy).
  """
  tok = processor.tokenizer
  vocab_size = config.dims.vocab_size
  tables = word_tables(tok, vocab, vocab_size)
  tabs = (jnp.asarray(tables.lead), jnp.asarray(tables.sep), jnp.asarray(tables.maybe))
  mean, std = image_stats(processor)
  family_of(config).map_pixels(config, pixel_values, lambda pix: check_pixel_layout(pix.shape, config) or pix)
  b, t = input_ids.shape
  n = max_new_tokens
  eos_ids = tuple(int(e) for e in eos_ids)
  cache_size = t + n + (n if settings.extra_slots < 0 else settings.extra_slots)
  loop = start_jit(params, config, input_ids, attention_mask, pixel_values, tabs, n=n,
                   cache_size=cache_size, eos_ids=eos_ids, pad_id=pad_id)
  images: dict[int, Any] = {}
  corrections = np.zeros(b, np.int32)
  checked = np.zeros(b, np.int32)
  while True:
    loop = run_jit(params, config, loop, tabs, n=n, eos_ids=eos_ids, pad_id=pad_id)
    event = np.asarray(loop.event)
    if not event.any():
      break
    h = jax.tree.map(np.asarray, {k: getattr(loop, k) for k in ("tokens", "count", "ev_start")})
    work = {}  # row -> (p, word, boxes [n, 4], status)
    for r in np.nonzero(event)[0]:
      p, q = int(h["ev_start"][r]), int(h["count"][r]) - 1  # the word is tokens[p:q]; tokens[q] started the next
      word = object_word(tok.decode(h["tokens"][r, p:q].tolist(), skip_special_tokens=True), vocab)
      if word is None:
        continue
      checked[r] += 1
      if r not in images:
        images[r] = pixel_image(config, pixel_values, int(r), mean, std)
      image = images[r]
      if settings.box_threshold >= 1.0:  # nothing scores above 1
        box, status = fov.FALLBACK_BOX, "not-detected"
      else:
        det = detector.detect(image, [word], settings.box_threshold)[0]
        box, status = target_box(det, image.size, settings.max_boxes, settings.min_box_area, settings.box_iou)
      entry = {"row": int(r), "position": p, "word": word, "status": status, "box": box}
      if trace is not None:
        trace.append(entry)
      if box is None:
        continue
      work[int(r)] = (p, fov.fov_boxes(box, settings.num_fovs, settings.expand_ratio), entry)
    if not work:
      continue
    out = _fov_batch(params, config, input_ids, attention_mask, h["tokens"], pixel_values, work, values, settings)
    rewind = {}
    for r, (p, _, entry) in work.items():
      cands = out[r]["tokens"]
      choice = select(settings.selection, cands, h["tokens"][r, :p], scorer, images[r], tok)
      c = int(cands[choice])
      entry.update(candidates=cands.tolist(), chosen=c, jsd=out[r]["jsd"].tolist())
      if c != int(h["tokens"][r, p]):
        rewind[r] = (p, c)
    if rewind:
      loop = _rewind(loop, rewind, n, eos_ids, pad_id)
      for r in rewind:
        corrections[r] += 1
  count = np.asarray(loop.count)
  done = np.asarray(loop.done)
  if not done.all():
    warnings.warn(f"HALC: rows {np.nonzero(~done)[0].tolist()} ran out of cache slots after {corrections[~done]} "
                  f"corrections and stopped early ({count[~done]} tokens); raise HALCConfig.extra_slots",
                  stacklevel=2)
  return {"tokens": np.asarray(loop.tokens), "num_tokens": count, "corrections": corrections, "checked": checked,
          "truncated": ~done}


FOV_BUCKET = 32  # generated-prefix lengths of the FOV forward are padded to a multiple of this


def _fov_batch(params, config, input_ids, attention_mask, tokens, pixel_values, work: dict, values,
               settings: Settings) -> dict:
  """Candidates of the examples in `work` {row: (p, boxes [n, 4], entry)}: one FOV forward over just those rows
  (their count padded to a power of two, the generated prefix to a multiple of FOV_BUCKET, so few shapes
  compile). Returns {row: {"tokens": [2m], "jsd": [P]}} (numpy)."""
  b = input_ids.shape[0]
  act = sorted(work)
  e = min(b, 1 << (len(act) - 1).bit_length())
  idx = np.asarray(act + [act[0]] * (e - len(act)), np.int32)
  upto = np.asarray([work[r][0] for r in idx], np.int32)
  width = min(tokens.shape[1], max(FOV_BUCKET, -(-int(upto.max()) // FOV_BUCKET) * FOV_BUCKET))
  boxes = np.stack([work[r][1] for r in idx]).astype(np.float32)
  sel = jnp.asarray(idx)
  out = fov_candidates_jit(params, config, input_ids[sel], attention_mask[sel], jnp.asarray(tokens[idx, :width]),
                           jnp.asarray(upto), jax.tree.map(lambda x: x[sel], pixel_values), jnp.asarray(boxes),
                           values.alpha, values.beta, num_pairs=settings.num_pairs, jsd_mode=settings.jsd,
                           contrast_mode=settings.contrast)
  toks, jsd = np.asarray(out["tokens"]), np.asarray(out["jsd"])
  return {r: {"tokens": toks[k], "jsd": jsd[k]} for k, r in enumerate(act)}


def select(selection: str, cands: np.ndarray, prefix: np.ndarray, scorer, image, tokenizer) -> int:
  """Index of the chosen candidate among the 2m: "top" the first; "matching" the best scorer(image, texts)."""
  if selection == "top":
    return 0
  texts = [tokenizer.decode(list(prefix) + [int(c)], skip_special_tokens=True).strip() for c in cands]
  scores = np.asarray(scorer(image, texts), np.float64).reshape(-1)
  if scores.shape[0] != len(texts):
    raise ValueError(f"HALC scorer returned {scores.shape[0]} scores for {len(texts)} candidate texts")
  return int(np.argmax(scores))


def _rewind(loop: Loop, rewind: dict, n: int, eos_ids, pad_id: int) -> Loop:
  """Rows r of `rewind` {r: (p, c)}: token c replaces position p, later tokens are dropped (host side)."""
  g = jax.tree.map(np.array, {k: getattr(loop, k) for k in
                              ("tok", "tokens", "count", "done", "word_start", "decided", "slot_of")})
  segs = np.array(loop.dec.key_segments)
  nxt = np.array(loop.dec.next_position)
  for r, (p, c) in rewind.items():
    q = int(g["count"][r])
    fed = g["slot_of"][r, p:q]
    segs[r, fed[fed >= 0]] = PAD  # the discarded tokens' keys become invisible
    nxt[r] += p - (q - 1)  # the next fed token (c) sits at position p
    g["tokens"][r, p] = c
    g["tokens"][r, p + 1:] = pad_id
    g["slot_of"][r, p:] = -1
    g["count"][r] = p + 1
    g["tok"][r] = c
    g["done"][r] = c in eos_ids or p + 1 >= n
    g["word_start"][r] = p
    g["decided"][r] = p + 1
  # next_position was advanced once per fed token: the token at position q - 1 (not fed yet) would go at
  # next_position; so the replacement at p goes at next_position - (q - 1 - p).
  dec = loop.dec.replace(key_segments=jnp.asarray(segs), next_position=jnp.asarray(nxt))
  return loop.replace(dec=dec, **{k: jnp.asarray(v) for k, v in g.items()})
