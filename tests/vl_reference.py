"""Helpers shared by the Qwen2.5-VL and InternVL parity tests (test-only: torch)."""

from __future__ import annotations

import numpy as np


def eager(model):
  """Switches a transformers model and all its sub-configs to eager attention (attention probabilities out)."""
  model.config._attn_implementation = "eager"
  for mod in model.modules():
    cfg = getattr(mod, "config", None)
    if cfg is not None:
      cfg._attn_implementation = "eager"
  return model


def assert_logits_and_attentions(out, ref, mask, atol=1e-5):
  """Ours vs transformers at real tokens: logits [B, T, V] and per-layer attention [B, H, T, T]."""
  mask = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(out["logits"])[mask], ref.logits.numpy()[mask], atol=atol, rtol=atol)
  assert len(ref.attentions) == out["attentions"].shape[0]
  for layer, ref_att in enumerate(ref.attentions):
    ours, theirs = np.asarray(out["attentions"][layer]), ref_att.numpy()
    for b in range(mask.shape[0]):
      v = mask[b]
      np.testing.assert_allclose(ours[b][:, v][:, :, v], theirs[b][:, v][:, :, v], atol=atol)


def greedy_full_forward(step, ids, mask, n_new: int, eos_ids=()):
  """Greedy decoding by full forward passes over a fixed buffer (one compiled shape).

  step(ids [B, S], mask [B, S]) -> logits [B, S, V]. The prompt (left padded) is followed by n_new slots, masked
  out until filled, so every pass sees exactly the sequence transformers' generate sees. EOS ids are never chosen
  (as transformers' min_new_tokens does), so all n_new tokens are compared.
  """
  b, t = ids.shape
  buf = np.concatenate([ids, np.zeros((b, n_new), ids.dtype)], 1)
  m = np.concatenate([mask, np.zeros((b, n_new), mask.dtype)], 1)
  out = []
  for j in range(n_new):
    logits = np.array(step(buf, m))[:, t + j - 1]
    logits[:, list(eos_ids)] = -np.inf
    nxt = logits.argmax(-1)
    buf[:, t + j], m[:, t + j] = nxt, 1
    out.append(nxt)
  return np.stack(out, 1)
