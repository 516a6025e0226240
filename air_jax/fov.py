"""HALC's fields of view (FOVs) and their contrast: pure pieces shared by the search and its tests.

Shape legend: n fields of view, V vocab, P = n (n - 1) / 2 pairs, m pairs kept, C channels, H x W pixels.

  fov_boxes      detector box -> n boxes growing exponentially (the official `context_density_embedding`)
  crop_resize    one box of a pixel array [..., C, H, W] resampled back to H x W (bilinear, border clamp)
  jsd_matrix     Jensen-Shannon divergence between the next-token distributions of every pair of FOVs
  candidates     the m most divergent pairs, each contrasted both ways -> 2m candidate tokens
Boxes are (x0, y0, x1, y1) normalised to [0, 1] of the image the model sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The official fallback when the detector finds no box for an object word (the central 60 % of the image).
FALLBACK_BOX = (0.2, 0.2, 0.8, 0.8)


def _expand(box, factor: float):
  """The official `expand_bbox`: grow (factor > 0) or shrink (< 0) each side by factor * size / 2, clipped."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  return (max(0.0, x0 - w * factor / 2), max(0.0, y0 - h * factor / 2), min(1.0, x1 + w * factor / 2),
          min(1.0, y1 + h * factor / 2))


def fov_boxes(box, n: int, ratio: float) -> np.ndarray:
  """[n, 4] fields of view around `box` (normalised x0, y0, x1, y1): official exponential expansion.

  n = 1: the box itself. Otherwise [box shrunk by ratio (by 0.8 when ratio > 0.8), box, box grown by ratio,
  that grown by ratio again, ...]: each FOV after the box is (1 + ratio) times the previous one's width and
  height (clipped to the image), so sizes grow exponentially with the index.
  """
  box = tuple(float(v) for v in box)
  if n == 1:
    return np.asarray([box], np.float64)
  out = [_expand(box, -min(ratio, 0.8)), box]
  while len(out) < n:
    out.append(_expand(out[-1], ratio))
  return np.asarray(out, np.float64)


def crop_resize(pix: jax.Array, box: jax.Array) -> jax.Array:
  """The region `box` [4] (normalised) of pix [..., C, H, W], resampled to H x W.

  Bilinear with half-pixel centres and border clamping (torch `grid_sample(align_corners=False,
  padding_mode="border")`): output pixel j samples the source at x0 * W + (j + 0.5) * (x1 - x0) - 0.5.
  """
  h, w = pix.shape[-2], pix.shape[-1]
  dtype = pix.dtype
  pix = pix.astype(jnp.float32)
  box = box.astype(jnp.float32)

  def coords(lo, hi, size):
    src = lo * size + (jnp.arange(size, dtype=jnp.float32) + 0.5) * (hi - lo) - 0.5
    src = jnp.clip(src, 0.0, size - 1.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0

  y0, y1, wy = coords(box[1], box[3], h)
  x0, x1, wx = coords(box[0], box[2], w)
  rows = pix[..., y0, :] * (1 - wy)[:, None] + pix[..., y1, :] * wy[:, None]  # [..., C, H, W]
  out = rows[..., x0] * (1 - wx) + rows[..., x1] * wx
  return out.astype(dtype)


def jsd_matrix(logits: jax.Array, mode: str = "paper") -> jax.Array:
  """[n, n] divergence between softmax(logits[i]) and softmax(logits[j]) (float32, natural log).

  mode "paper": JSD(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2 with M = (P + Q) / 2.
  mode "official": KL(M || P) / 2 + KL(M || Q) / 2 (the official code passes log P as the input and M as the
  target of torch's `F.kl_div`, which computes KL(target || input)).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [n, V]
  p = jnp.exp(logp)
  m = 0.5 * (p[:, None] + p[None, :])  # [n, n, V]
  logm = jnp.log(m)
  if mode == "paper":
    kl_i = jnp.sum(jnp.where(p[:, None] > 0, p[:, None] * (logp[:, None] - logm), 0.0), -1)
    kl_j = jnp.sum(jnp.where(p[None, :] > 0, p[None, :] * (logp[None, :] - logm), 0.0), -1)
  elif mode == "official":
    kl_i = jnp.sum(jnp.where(m > 0, m * (logm - logp[:, None]), 0.0), -1)
    kl_j = jnp.sum(jnp.where(m > 0, m * (logm - logp[None, :]), 0.0), -1)
  else:
    raise ValueError(f"unknown JSD mode {mode!r}; expected 'paper' or 'official'")
  return 0.5 * (kl_i + kl_j)


def pair_index(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The P pairs (i < j) in row-major order of the upper triangle (the official flattening order)."""
  i, j = np.triu_indices(n, k=1)
  return i.astype(np.int32), j.astype(np.int32)


def contrast(final: jax.Array, base: jax.Array, alpha, beta, mode: str = "paper") -> jax.Array:
  """Contrast logits of FOV `final` against FOV `base` ([..., V] each).

  mode "paper": (1 + alpha) * final - alpha * base, -inf where final < log(beta) + max(final) (the adaptive
  plausibility constraint on the focal view). mode "official": final - alpha * base on raw logits (the official
  masking step `base[final < -1e3] = -1e3` never fires on raw logits, so there is no cut-off).
  """
  final, base = final.astype(jnp.float32), base.astype(jnp.float32)
  if mode == "paper":
    out = (1.0 + alpha) * final - alpha * base
    cut = final < jnp.log(beta) + jnp.max(final, axis=-1, keepdims=True)
    return jnp.where(cut, -jnp.inf, out)
  if mode == "official":
    return final - alpha * base
  raise ValueError(f"unknown contrast mode {mode!r}; expected 'paper' or 'official'")


def candidates(logits: jax.Array, num_pairs: int, alpha, beta, *, jsd_mode: str = "paper",
               contrast_mode: str = "paper") -> dict:
  """The 2m candidate tokens of one example from its FOV logits [n, V].

  Pairs (i < j, i the smaller FOV) are ranked by divergence, descending (ties: upper-triangle order, as a
  stable sort); each of the top m pairs gives two candidates, as the official
  `context_layer_double_multi_contrastive_decoding`: first final = j (the larger FOV) against base = i, then
  final = i against base = j. Each candidate is the argmax of its contrast logits.

  Returns {"tokens": [2m] int32, "final": [2m], "base": [2m] FOV indices, "jsd": [P] in pair order}.
  """
  n = logits.shape[0]
  pi, pj = pair_index(n)
  jsd = jsd_matrix(logits, jsd_mode)[pi, pj]  # [P]
  order = jnp.argsort(-jsd, stable=True)[:num_pairs]
  i, j = jnp.asarray(pi)[order], jnp.asarray(pj)[order]
  final = jnp.stack([j, i], -1).reshape(-1)  # [2m]: (j vs i), (i vs j) per pair
  base = jnp.stack([i, j], -1).reshape(-1)
  scores = contrast(logits[final], logits[base], alpha, beta, contrast_mode)  # [2m, V]
  return {"tokens": jnp.argmax(scores, -1).astype(jnp.int32), "final": final, "base": base, "jsd": jsd}
