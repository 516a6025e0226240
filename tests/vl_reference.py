"""Helpers shared by the Qwen2.5-VL, InternVL and analysis parity tests (test-only: torch)."""

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


def assert_layer_reads(states, norms, hidden_states, lm, cfg, atol=1e-4):
  """The analyses' layer inputs [L, 1, T, E] and value norms [L, 1, H, T] against a transformers Llama-style decoder
  `lm` (layers with input_layernorm, v_proj, o_proj) and its output_hidden_states."""
  import torch

  h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
  d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
  for layer in range(cfg.num_hidden_layers):
    x = hidden_states[layer][0].double()
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    np.testing.assert_allclose(states[layer, 0], want.numpy(), atol=atol, rtol=atol)
    block = lm.layers[layer]
    with torch.no_grad():
      v = block.self_attn.v_proj(block.input_layernorm(hidden_states[layer][0])).reshape(-1, kv, d)
      wo = block.self_attn.o_proj.weight.reshape(-1, h, d)
      out = torch.stack([v[:, head // (h // kv)] @ wo[:, head].T for head in range(h)])  # [H, T, E]
    np.testing.assert_allclose(norms[layer, 0], out.norm(dim=-1).numpy(), atol=atol, rtol=atol)
