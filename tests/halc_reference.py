"""A torch reference of HALC (one example at a time, no KV cache), written from the paper and the official code
(BillChan226/HALC `context_density/halc.py`, `halc_dola_beam_search`), with the readings documented in
air_jax.methods.halc: greedy base decoding, object words from a CHAIR vocabulary checked when complete, the
detector on the image the model sees, n FOVs by the official exponential expansion, crops resampled with
`grid_sample`, JSD of every pair, the top m pairs contrasted both ways, one candidate chosen, the word rolled
back when the candidate differs from its first token.

Test-only: imports torch and transformers.
"""

from __future__ import annotations

import string

import numpy as np
import torch
import torch.nn.functional as F

PUNCT = string.punctuation + "“”‘’"
FALLBACK = (0.2, 0.2, 0.8, 0.8)


def expand_bbox(box, factor):
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  return [max(0, x0 - w * factor / 2), max(0, y0 - h * factor / 2), min(1, x1 + w * factor / 2),
          min(1, y1 + h * factor / 2)]


def fov_boxes(box, n, ratio):
  """Official `context_density_embedding`: [shrunk, box, grown, grown again, ...]."""
  if n == 1:
    return [list(box)]
  out = [expand_bbox(box, -0.8 if ratio > 0.8 else -ratio), list(box)]
  for _ in range(1, n - 1):
    out.append(expand_bbox(out[-1], ratio))
  return out


def crop(pix, box):
  """pix [1, C, H, W] -> the box resampled to H x W (bilinear, half-pixel centres, border)."""
  _, _, h, w = pix.shape
  box = torch.tensor(box, dtype=torch.float32)
  xs = box[0] * w + (torch.arange(w, dtype=torch.float32) + 0.5) * (box[2] - box[0]) - 0.5
  ys = box[1] * h + (torch.arange(h, dtype=torch.float32) + 0.5) * (box[3] - box[1]) - 0.5
  gx, gy = (2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1
  grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]  # [1, H, W, (x, y)]
  return F.grid_sample(pix.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def jsd(a, b, mode):
  """a, b [1, V] logits."""
  la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
  m = 0.5 * (la.exp() + lb.exp())
  if mode == "official":  # F.kl_div(input=log P, target=M) = KL(M || P)
    return float(0.5 * (F.kl_div(la, m, reduction="batchmean") + F.kl_div(lb, m, reduction="batchmean")))
  return float(0.5 * (F.kl_div(m.log(), la.exp(), reduction="batchmean")
                      + F.kl_div(m.log(), lb.exp(), reduction="batchmean")))


def contrast(final, base, alpha, beta, mode):
  if mode == "official":
    return final - alpha * base
  out = (1 + alpha) * final - alpha * base
  cut = final < np.log(beta) + final.max(-1, keepdim=True).values
  return out.masked_fill(cut, -float("inf"))


def pixel_image(pix, mean, std):
  from PIL import Image

  arr = pix[0].numpy().astype(np.float32)
  mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
  std = np.asarray(std, np.float32).reshape(-1, 1, 1)
  rgb = np.clip(np.round((arr * std + mean) * np.float32(255.0)), 0, 255).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(np.moveaxis(rgb, 0, -1)))


class Words:
  """Word segmentation of generated tokens: a token starts a word when its piece leads ("▁"/"Ġ"), spells no letter
  or digit (or is special), or follows such a separator."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.special = set(tokenizer.all_special_ids)

  def _sep(self, i):
    if i in self.special or i >= len(self.tok):
      return True
    piece = self.tok.convert_ids_to_tokens(int(i))
    return not any(ch.isalnum() for ch in piece.lstrip("▁Ġ"))

  def starts(self, i, prev):
    if prev is None or self._sep(i) or self._sep(prev):
      return True
    return self.tok.convert_ids_to_tokens(int(i))[:1] in ("▁", "Ġ")


def object_word(text, vocab):
  from eval.chair_metric import singularize

  w = text.strip().strip(PUNCT).lower()
  if not w or " " in w:
    return None
  s = singularize(w)
  return s if vocab.category_of(s) is not None else None


@torch.no_grad()
def next_logits(model, ids, mask, pix):
  """Last-position logits [R, V] of a full forward (left padded rows)."""
  pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
  return model(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=pos).logits[:, -1].float()


def reference_halc(model, processor, input_ids, attention_mask, pixel_values, *, vocab, detector, max_new_tokens,
                   eos_ids, num_fovs=4, expand_ratio=0.6, box_threshold=0.4, num_pairs=6, alpha=0.05, beta=0.1,
                   max_boxes=3, jsd_mode="paper", contrast_mode="paper", selection="top", scorer=None, trace=None):
  """HALC on ONE example: input_ids / attention_mask [1, T], pixel_values [1, C, H, W]. Returns the tokens."""
  tok = processor.tokenizer
  words = Words(tok)
  ip = processor.image_processor
  image = pixel_image(pixel_values, ip.image_mean, ip.image_std)
  gen, decided, word_start = [], 0, 0
  ones = lambda k: torch.ones((1, k), dtype=attention_mask.dtype)

  while len(gen) < max_new_tokens:
    seq = torch.cat([input_ids, torch.tensor([gen], dtype=input_ids.dtype)], 1)
    y = int(next_logits(model, seq, torch.cat([attention_mask, ones(len(gen))], 1), pixel_values).argmax(-1))
    q = len(gen)
    if words.starts(y, gen[-1] if gen else None):
      p = word_start
      word = object_word(tok.decode(gen[p:q], skip_special_tokens=True), vocab) if q > p and p >= decided else None
      if word is not None:
        c = decide(model, tok, input_ids, attention_mask, pixel_values, gen[:p], word, image, detector,
                   num_fovs, expand_ratio, box_threshold, num_pairs, alpha, beta, max_boxes, jsd_mode,
                   contrast_mode, selection, scorer, trace, p)
        if c is not None and c != gen[p]:
          gen = gen[:p] + [c]
          decided, word_start = p + 1, p
          if c in eos_ids:
            break
          continue
      word_start = q
    gen.append(y)
    if y in eos_ids:
      break
  return gen


def extract_detection(boxes, size, area_threshold=0.01, iou_threshold=0.6):
  """The official detector.py `extract_detection` on one word's pixel boxes: normalised, clipped, rounded to 3
  decimals; boxes of area < 0.01 skipped, and boxes with IoU > 0.6 to an already kept one (same instance)."""
  w, h = size
  normed = np.around(np.clip(np.asarray(boxes, np.float64).reshape(-1, 4) / np.array([w, h, w, h]), 0.0, 1.0), 3)
  kept = []
  for b in normed.tolist():
    if (b[2] - b[0]) * (b[3] - b[1]) < area_threshold:
      continue
    same = False
    for k in kept:
      iw, ih = min(b[2], k[2]) - max(b[0], k[0]), min(b[3], k[3]) - max(b[1], k[1])
      inter = max(iw, 0.0) * max(ih, 0.0)
      union = (b[2] - b[0]) * (b[3] - b[1]) + (k[2] - k[0]) * (k[3] - k[1]) - inter
      same = same or (union > 0 and inter / union > iou_threshold)
    if not same:
      kept.append(b)
  return kept


def decide(model, tok, input_ids, attention_mask, pixel_values, prefix, word, image, detector, n, ratio, threshold,
           m, alpha, beta, max_boxes, jsd_mode, contrast_mode, selection, scorer, trace, p):
  """The candidate token for position p (None when the word is skipped)."""
  if threshold >= 1.0:
    boxes = np.zeros((0, 4))
  else:
    boxes = np.asarray(detector.detect(image, [word], threshold)[0].boxes, np.float64).reshape(-1, 4)
  entry = {"position": p, "word": word}
  if trace is not None:
    trace.append(entry)
  boxes = extract_detection(boxes, image.size)
  if max_boxes is not None and len(boxes) > max_boxes:
    entry["status"] = "skipped"
    return None
  if len(boxes) == 0:
    box, entry["status"] = FALLBACK, "not-detected"
  else:
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    box, entry["status"] = np.asarray(boxes[areas.index(min(areas))]), "detected"
  fovs = fov_boxes(box, n, ratio)
  seq = torch.cat([input_ids, torch.tensor([prefix], dtype=input_ids.dtype)], 1)
  mask = torch.cat([attention_mask, torch.ones((1, len(prefix)), dtype=attention_mask.dtype)], 1)
  logits = [next_logits(model, seq, mask, crop(pixel_values, b)) for b in fovs]  # each [1, V]
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
  div = [jsd(logits[i], logits[j], jsd_mode) for i, j in pairs]
  order = sorted(range(len(pairs)), key=lambda k: -div[k])[:m]  # stable: upper-triangle order on ties
  cands = []
  for k in order:
    i, j = pairs[k]
    cands.append(int(contrast(logits[j], logits[i], alpha, beta, contrast_mode).argmax(-1)))  # focal: larger FOV
    cands.append(int(contrast(logits[i], logits[j], alpha, beta, contrast_mode).argmax(-1)))
  if selection == "top":
    choice = 0
  else:
    texts = [tok.decode(list(prefix) + [c], skip_special_tokens=True).strip() for c in cands]
    choice = int(np.argmax(np.asarray(scorer(image, texts), np.float64)))
  entry.update(candidates=cands, chosen=cands[choice], jsd=div)
  return cands[choice]
