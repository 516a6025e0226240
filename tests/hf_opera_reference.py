"""PyTorch reference of OPERA on transformers' eager LLaVA (test-only), one example (batch 1, as the official runs).

Written from the official `opera_beam_search` (shikiw/OPERA, transformers-4.29.2 generation/utils.py) and its
BeamSearchScorer, independently of air_jax. It keeps the official structure: a list of per-step history states,
`attn_previous` grown row by row and reordered by the beam indices, one forward per candidate, roll-back by
restoring a history state and re-running the model. Unlike the official code it runs every forward on the whole
sequence (no KV cache): the same attention rows, simpler to keep right.

`opera(model, ids, pixels, cfg, n, eos_ids, prompt_len)` -> (tokens list, number of roll-backs). ids [1, T0]
(image tokens expanded, as the processor gives them), pixels [1, C, H, W]; prompt_len: the sequence length the
4.29 scorer counts for the prompt ("official": the image counted as one token; "generated": pass 1 and
`generated=True`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


class Hyps:
  """transformers-4.29 BeamHypotheses (one example)."""

  def __init__(self, k, lp, early_stopping):
    self.k, self.lp, self.early, self.beams, self.worst = k, lp, early_stopping, [], 1e9

  def add(self, hyp, sum_logprobs, length):
    score = sum_logprobs / (length ** self.lp)
    if len(self.beams) < self.k or score > self.worst:
      self.beams.append((score, hyp))
      if len(self.beams) > self.k:
        ranked = sorted([(s, i) for i, (s, _) in enumerate(self.beams)])
        del self.beams[ranked[0][1]]
        self.worst = ranked[1][0]
      else:
        self.worst = min(score, self.worst)

  def is_done(self, best, cur_len):
    if len(self.beams) < self.k:
      return False
    if self.early:
      return True
    return self.worst >= best / cur_len ** self.lp


class Scorer:
  """transformers-4.29 BeamSearchScorer.process / finalize for batch 1 (generated tokens only are tracked)."""

  def __init__(self, k, lp, early_stopping, eos_ids):
    self.k, self.hyps, self.done, self.eos = k, Hyps(k, lp, early_stopping), False, set(eos_ids)

  def process(self, gen, scores, tokens, indices, cur_len):
    """gen: list of K token lists; scores/tokens/indices [2K] -> (beam scores, next tokens, beam idx)."""
    nxt_s, nxt_t, nxt_i = [], [], []
    for rank, (tok, sc, idx) in enumerate(zip(tokens.tolist(), scores.tolist(), indices.tolist())):
      if tok in self.eos:
        if rank >= self.k:
          continue
        self.hyps.add((list(gen[idx]), tok), sc, cur_len)
      else:
        nxt_s.append(sc)
        nxt_t.append(tok)
        nxt_i.append(idx)
      if len(nxt_s) == self.k:
        break
    self.done = self.done or self.hyps.is_done(float(scores.max()), cur_len)
    return torch.tensor(nxt_s), torch.tensor(nxt_t), torch.tensor(nxt_i)

  def finalize(self, gen, beam_scores, fin_len):
    if not self.done:
      for b in range(self.k):
        self.hyps.add((list(gen[b]), None), float(beam_scores[b]), fin_len)
    best = sorted(self.hyps.beams, key=lambda x: x[0])[-1][1]
    return best[0] + ([best[1]] if best[1] is not None else [])


def _prompt_embeds(model, ids, pixels):
  """The language model's input embeddings of the prompt (image features merged), captured by a hook."""
  seen = {}

  def hook(module, args, kwargs):
    seen["embeds"] = kwargs["inputs_embeds"]

  handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
  try:
    model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
  finally:
    handle.remove()
  return seen["embeds"]


def _last_rows(model, prompt, seq):
  """Full forward of [prompt embeds | seq's generated tokens] (K rows): (last-row logits [K, V], the last layer's
  head-max attention rows [K, L, L]). Generated tokens are always text, even the image token's id (the official
  LLaVA code marks images with an id outside the vocabulary)."""
  t0 = prompt.shape[1]
  embeds = torch.cat([prompt.expand(seq.shape[0], -1, -1), model.get_input_embeddings()(seq[:, t0:])], 1)
  out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(seq), output_attentions=True)
  return out.logits[:, -1].float(), out.attentions[-1].float().max(1).values


def _mode(x):
  return x.mode(-1).values


@torch.no_grad()
def opera(model, ids: np.ndarray, pixels: np.ndarray, cfg, n: int, eos_ids, prompt_len: int, image_token_id: int,
          generated: bool = False):
  k, c, scale, thr, w = cfg.num_beams, cfg.num_attn_candidates, cfg.scale_factor, cfg.threshold, cfg.penalty_weight
  t0 = ids.shape[1]
  img = np.nonzero(ids[0] == image_token_id)[0]
  image_start, image_end, response_start = int(img[0]), int(img[-1]), t0
  seq = torch.as_tensor(ids, dtype=torch.long).repeat(k, 1)  # [K, L]
  pix = _prompt_embeds(model, seq[:1], torch.as_tensor(pixels))
  scorer = Scorer(k, cfg.length_penalty, cfg.early_stopping, eos_ids)
  beam_scores = torch.tensor([0.0] + [-1e9] * (k - 1))
  history, locs_hist = [], []
  beam_next, beam_idx, attn_prev = None, None, None
  max_rb = torch.zeros(cfg.window_size + 2)
  rejects = [[] for _ in range(cfg.window_size + 2)]
  rollbacks = 0
  off = lambda length: (length - t0 + 1) if generated else (length - t0 + prompt_len)
  while True:
    state = {"seq": seq.clone(), "scorer": copy.deepcopy(scorer)}
    logits, rows = _last_rows(model, pix, seq)
    if attn_prev is None:
      attn_prev = rows[:, None]  # [K, 1, L, L]
    else:
      attn_prev = torch.cat([attn_prev, torch.zeros_like(attn_prev).sum(-1, keepdim=True)], -1)
      attn_prev = torch.cat([attn_prev[beam_idx], rows[:, None, -1:]], -2)
    state["attn_prev"] = attn_prev
    cand_s, cand_t = torch.topk(logits, c, dim=-1)
    state.update(beam_scores=beam_scores.clone(), beam_next=beam_next, beam_idx=beam_idx)
    attn_last = []
    for j in range(c):
      _, rows_c = _last_rows(model, pix, torch.cat([seq, cand_t[:, j:j + 1]], -1))
      sq = torch.cat([attn_prev, torch.zeros_like(attn_prev).sum(-1, keepdim=True)], -1)
      attn_last.append(torch.cat([sq, rows_c[:, None, -1:]], -2))
    attn_last = torch.cat(attn_last, 1)
    attn_last = attn_last / attn_last.sum(-1, keepdim=True)
    local = scale * attn_last[:, :, response_start:, response_start:]
    local_scores = torch.zeros(local.shape[:2] + local.shape[-1:], dtype=torch.float16)
    for j in range(local.shape[-1]):
      local_scores[..., j] = (1e-7 * local[..., j:, j].prod(-1)).to(torch.float32)
    cur_resp = local.shape[-1]
    attn_i = attn_last[:, :, -1, image_start:image_end + 1].sum(-1)
    rb_scores, rb_locs = local_scores.max(-1)
    loc = _mode(_mode(rb_locs))
    penalty = -attn_i if cur_resp <= 10 else rb_scores
    locs_hist.append(_mode(rb_locs)[:, None])
    gathers = torch.cat(locs_hist, -1)
    cand_s = cand_s - w * penalty
    history.append(state)
    fire = False
    if all(int((g == loc).long().sum()) > int(thr) for g in gathers) and int(loc) >= 10:
      pos = int(loc) + 1
      fire = True
      if max_rb[pos] >= c:
        pos -= 1
        if max_rb[pos] >= c:
          fire = False
      if fire:
        max_rb[pos] += 1
    if fire:
      rollbacks += 1
      for _ in range(cur_resp - pos - 2):
        history.pop(-1)
        locs_hist.pop(-1)
      st = history[-2]
      seq, scorer, attn_prev = st["seq"], st["scorer"], st["attn_prev"]
      beam_scores = st["beam_scores"]
      beam_next, beam_idx = history[-1]["beam_next"], history[-1]["beam_idx"]
      logits, _ = _last_rows(model, pix, seq)  # the official code re-runs the model on the restored sequence
      history.pop(-1)
      locs_hist.pop(-1)
      rejects[pos + 1] = []
      logits = logits - (999.0 + logits.min(-1, keepdim=True).values)
      flat = logits.reshape(1, -1)
      rej = beam_idx * logits.shape[-1] + beam_next
      rejects[pos] = rej if len(rejects[pos]) == 0 else torch.cat([rejects[pos], rej])
      flat = flat.scatter(-1, rejects[pos][None], -999.0)
      logits = flat.reshape(k, -1)
    else:
      logits = torch.full_like(logits, -999.0).scatter(-1, cand_t, cand_s)
    scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
    v = scores.shape[-1]
    top_s, top_i = torch.topk(scores.reshape(-1), 2 * k)
    gen = seq[:, t0:].tolist()
    beam_scores, beam_next, beam_idx = scorer.process(gen, top_s, top_i % v, top_i // v, off(seq.shape[1]))
    seq = torch.cat([seq[beam_idx], beam_next[:, None]], -1)
    if scorer.done or seq.shape[1] >= t0 + n:
      break
  tokens = scorer.finalize(seq[:, t0:].tolist(), beam_scores, (seq.shape[1] - t0) if generated else off(seq.shape[1]))
  return tokens, rollbacks
