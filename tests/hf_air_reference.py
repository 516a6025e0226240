"""A PyTorch reference of the AIR attention edits, installed into transformers' Llama eager attention.

Test-only, written from the method notes and the official code's formulas, independently of models.rectify: it
reads the user-facing `AIRConfig` fields (not a compiled spec), resolves layers and heads itself, and edits one
(example, head, row) at a time. Used for forward parity and for greedy-generation parity.

Usage:
  with air_attention_patch(air_config, prompt_segments, num_layers, num_heads):
    hf_model(**inputs)            # or hf_model.generate(...)
`prompt_segments` [B, T0] holds the prompt's segment ids (models.segments: PAD -1, SYSTEM 0, IMAGE 1, TEXT 2);
key positions at or after T0 (generated tokens) are TEXT. Queries are the last q_len key positions (the HF cache
layout); a call is a prefill when q_len == k_len.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

PAD, SYSTEM, IMAGE, TEXT = -1, 0, 1, 2
EPS = 1e-8


def _layers(cfg, op: str, num_layers: int) -> set[int]:
  rng = getattr(cfg, f"{op}_layers")
  if rng is None:
    return set(range(num_layers))
  a, b = rng
  if cfg.layer_ref is not None:  # proportional scaling, non-empty ranges stay non-empty
    a2 = min(int(math.floor(a * num_layers / cfg.layer_ref + 0.5)), num_layers - 1)
    b2 = int(math.floor(b * num_layers / cfg.layer_ref + 0.5))
    a, b = a2, min(max(b2, a2 + 1), num_layers)
  return set(range(a, b))


def _heads(cfg, op: str, layer: int, num_layers: int, num_heads: int) -> list[int]:
  if layer not in _layers(cfg, op, num_layers):
    return []
  if getattr(cfg, f"{op}_heads") == "all" or cfg.heads == "all":
    return list(range(num_heads))
  return sorted(h for (l, h) in cfg.heads if l == layer)


class _Call:
  """What one attention call sees: segments, visibility and the row rules."""

  def __init__(self, segments: np.ndarray, mask, q_len: int, k_len: int):
    b = segments.shape[0]
    seg = np.full((b, k_len), TEXT, np.int64)
    n = min(k_len, segments.shape[1])
    seg[:, :n] = segments[:, :n]
    self.key_seg = seg
    self.q_pos = list(range(k_len - q_len, k_len))
    self.query_seg = seg[:, k_len - q_len:]
    self.prefill = q_len == k_len
    if mask is None:
      vis = np.tril(np.ones((q_len, k_len), bool), k=k_len - q_len)[None].repeat(b, 0)
    else:
      vis = (mask[:, 0] == 0).cpu().numpy()
    self.visible = vis & (seg != PAD)[:, None, :]

  def rows(self, cfg, op: str, b: int, include_pad: bool = False) -> list[int]:
    rule = getattr(cfg, f"{op}_rows")
    out = []
    for i in range(len(self.q_pos)):
      if self.query_seg[b, i] == PAD and not include_pad:
        continue
      if rule == "last" and i != len(self.q_pos) - 1:
        continue
      if rule == "text" and self.query_seg[b, i] != TEXT:
        continue
      out.append(i)
    return out


def _scores_edits(s: torch.Tensor, cfg, call: _Call, layer: int, nl: int, nh: int) -> torch.Tensor:
  s = s.clone()
  nb = s.shape[0]
  if cfg.qk_rescale:
    heads = _heads(cfg, "qk", layer, nl, nh)
    block = s.pow(2).sum(dim=(-2, -1))  # [B, H] whole pre-mask block (official)
    new = s.clone()
    for b in range(nb):
      for i in call.rows(cfg, "qk", b):
        vis = torch.from_numpy(call.visible[b, i])
        energy = block[b] if cfg.official_compat else s[b, :, i][:, vis].pow(2).sum(-1)
        target = cfg.qk_target_scale * energy.mean()
        factor = torch.sqrt(target / (energy + EPS)).clamp(cfg.qk_clamp[0], cfg.qk_clamp[1])
        for h in heads:
          new[b, h, i] = s[b, h, i] * factor[h]
    s = new
  if cfg.rebalance:
    heads = _heads(cfg, "rebalance", layer, nl, nh)
    for b in range(nb):
      img = torch.from_numpy(call.key_seg[b] == IMAGE)
      sys_ = torch.from_numpy(call.key_seg[b] == SYSTEM)
      for i in call.rows(cfg, "rebalance", b):
        for h in heads:
          s[b, h, i, img] = s[b, h, i, img] * cfg.image_gain
          s[b, h, i, sys_] = s[b, h, i, sys_] * cfg.system_gain
  if cfg.lens:
    heads = _heads(cfg, "lens", layer, nl, nh)
    new = s.clone()
    for b in range(nb):
      for i in call.rows(cfg, "lens", b):
        keys = torch.from_numpy((call.key_seg[b] == IMAGE) & call.visible[b, i])
        boost = s[b, :, i][:, keys].abs().mean(0)  # over all heads
        for h in heads:
          new[b, h, i, keys] = s[b, h, i, keys] + cfg.lens_alpha * boost
    s = new
  return s


def _project_default(p: torch.Tensor, call: _Call, b: int, i: int, beta: float) -> torch.Tensor:
  """Row i of one head, kept a distribution: self-weight zero-trace and mass rescale (prefill), then shrinkage."""
  vis = torch.from_numpy(call.visible[b, i])
  out = p[i].clone()
  if int(vis.sum()) < 2:
    return out
  row = p[i].clone()
  m = row[vis].sum()
  if call.prefill:
    slot = call.q_pos[i]
    rows = [j for j in range(i + 1) if call.query_seg[b, j] != PAD]
    c = torch.stack([p[j, call.q_pos[j]] for j in rows]).mean()  # trace / L of the truncated causal block
    hat = row.clone()
    hat[slot] = hat[slot] - torch.minimum(c, row[slot])
    if hat[vis].sum() > 0:
      row = hat * (m / hat[vis].sum())
  out[vis] = (1 - beta) * row[vis] + beta * m / vis.sum()
  return out


def _project_official(p: torch.Tensor, prefill: bool, beta: float) -> torch.Tensor:
  """The official whole-matrix projection of one head [T, S] (future leak included)."""
  if prefill:
    n = p.shape[-1]
    a_hat = p - torch.eye(n) * (torch.trace(p) / n)
    a_tilde = a_hat * torch.sqrt(p.pow(2).sum() / (a_hat.pow(2).sum() + EPS))
  else:
    a_tilde = p
  return (1 - beta) * a_tilde + beta * a_tilde.mean()


def _pattern_edits(p: torch.Tensor, cfg, call: _Call, layer: int, nl: int, nh: int) -> torch.Tensor:
  p = p.clone()
  nb = p.shape[0]
  if cfg.adhh:
    heads = _heads(cfg, "adhh", layer, nl, nh)
    new = p.clone()
    for h in heads:
      for b in range(nb):
        text = torch.from_numpy(call.key_seg[b] == TEXT)
        for i in call.rows(cfg, "adhh", b):
          if cfg.official_compat:  # the official trigger sums the row over the whole batch
            mass = sum(p[bb, h, i, torch.from_numpy(call.key_seg[bb] == TEXT)].sum() for bb in range(nb))
          else:
            mass = p[b, h, i, text].sum()
          if mass >= cfg.adhh_threshold:
            new[b, h, i, text] = 0.0
    p = new
  if cfg.realloc:
    heads = _heads(cfg, "realloc", layer, nl, nh)
    for b in range(nb):
      text = torch.from_numpy(call.key_seg[b] == TEXT)
      img = torch.from_numpy(call.key_seg[b] == IMAGE)
      for i in call.rows(cfg, "realloc", b):
        vis = torch.from_numpy(call.visible[b, i])
        for h in heads:
          if p[b, h, i, text].sum() > cfg.tau_text:
            row = p[b, h, i].clone()
            row[img] *= cfg.visual_factor
            row[text] *= cfg.text_factor
            if cfg.renormalize and row[vis].sum() > 0:
              row = row / row[vis].sum()
            p[b, h, i] = row
  if cfg.projection:
    heads = _heads(cfg, "projection", layer, nl, nh)
    new = p.clone()
    for b in range(nb):
      for h in heads:
        whole = _project_official(p[b, h], call.prefill, cfg.beta) if cfg.official_compat else None
        # the official code projects every row of the matrix, left-padding rows included
        for i in call.rows(cfg, "projection", b, include_pad=bool(cfg.official_compat)):
          new[b, h, i] = whole[i] if cfg.official_compat else _project_default(p[b, h], call, b, i, cfg.beta)
    p = new
  return p


@contextlib.contextmanager
def air_attention_patch(cfg, prompt_segments, num_layers: int, num_heads: int):
  """Replaces transformers' Llama `eager_attention_forward` with one that applies `cfg` (an AIRConfig).

  The model must use attn_implementation="eager". The original function is restored on exit.
  """
  import transformers.models.llama.modeling_llama as ml

  segments = np.asarray(prompt_segments)
  original = ml.eager_attention_forward

  def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    del kwargs
    k = ml.repeat_kv(key, module.num_key_value_groups)
    v = ml.repeat_kv(value, module.num_key_value_groups)
    s = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    call = _Call(segments, attention_mask, s.shape[2], s.shape[3])
    layer = module.layer_idx
    s = _scores_edits(s, cfg, call, layer, num_layers, num_heads)
    if attention_mask is not None:
      s = s + attention_mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    p = _pattern_edits(p, cfg, call, layer, num_layers, num_heads)
    out = torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, p

  ml.eager_attention_forward = patched
  try:
    yield
  finally:
    ml.eager_attention_forward = original
