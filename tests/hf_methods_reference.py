"""PyTorch references of VCD, DoLa, PAI and FarSight on transformers' eager LLaVA (test-only).

Written from the papers and the official code (DAMO-NLP-SG/VCD `vcd_sample.py` / `vcd_add_noise.py`,
voidism/DoLa `dola_greedy_decode`, LALBJ/PAI `attention.py` / `CFG.py`; FarSight: our reading of the paper, see
air_jax.methods.farsight), independently of air_jax: they read the user-facing config fields, run one example at a
time (no padding) and decode with transformers' KV cache, as the official code does (each view its own stream).

`greedy(model, ids, pixels, cfg, n)` returns (tokens [n], per-step logits [n, V]) for one example: ids [1, T]
(image tokens expanded, as the processor gives them), pixels [1, C, H, W].
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _eager_attention(patched):
  """transformers' eager attention replaced by `patched` (None: left alone) inside the block."""
  import transformers.models.llama.modeling_llama as ml

  original = ml.eager_attention_forward
  ml.eager_attention_forward = patched or original
  try:
    yield
  finally:
    ml.eager_attention_forward = original


def _forward(model, ids, pixels, **kw):
  kw = dict(kw)
  if pixels is not None:
    kw["pixel_values"] = pixels
  return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


class _Cached:
  """One KV-cached stream (the official runs use the cache, and PAI's last-row edit depends on it)."""

  def __init__(self, model, ids, pixels):
    self.model, self.ids, self.pixels, self.past = model, ids, pixels, None

  def forward(self, last_token=None, **kw):
    """Feeds the prompt (first call) or the last chosen token; generated tokens never carry pixels."""
    if self.past is None:
      out = _forward(self.model, self.ids, self.pixels, use_cache=True, **kw)
    else:
      self.ids = torch.cat([self.ids, torch.tensor([[last_token]])], dim=1)
      out = self.model(input_ids=self.ids[:, -1:], attention_mask=torch.ones_like(self.ids),
                       past_key_values=self.past, use_cache=True, **kw)
    self.past = out.past_key_values
    return out

  def logits(self, last_token=None):
    return self.forward(last_token).logits[:, -1].float()


# -- VCD ----------------------------------------------------------------------------------------------------------


def vcd_noised(pixels: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
  """Official forward diffusion (vcd_add_noise.add_diffusion_noise) with a given standard normal eps."""
  betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
  abar = torch.cumprod(1 - betas, dim=0)
  return torch.sqrt(abar[step]) * pixels + torch.sqrt(1 - abar[step]) * eps


def vcd_step(pos_stream, neg_stream, cfg, last_token):
  pos = pos_stream.logits(last_token)
  neg = neg_stream.logits(last_token)
  cutoff = torch.log(torch.tensor(cfg.beta)) + pos.max(dim=-1, keepdim=True).values
  diffs = (1 + cfg.alpha) * pos - cfg.alpha * neg
  return diffs.masked_fill(pos < cutoff, -float("inf"))


# -- DoLa ---------------------------------------------------------------------------------------------------------


def dola_candidates(cfg, num_layers: int) -> list[int]:
  out = []
  for j in cfg.layers[:-1]:
    s = int(math.floor(j * num_layers / cfg.layer_ref + 0.5)) if cfg.layer_ref else j
    if s != num_layers and s not in out:
      out.append(s)
  return out


def dola_step(stream, cfg, last_token):
  model = stream.model
  out = stream.forward(last_token, output_hidden_states=True)
  seq = stream.ids
  lm = model.model.language_model
  final = out.logits[:, -1].float()
  cands = dola_candidates(cfg, lm.config.num_hidden_layers)
  prem = {}
  for j in cands:
    h = out.hidden_states[j][:, -1]
    prem[j] = model.lm_head(lm.norm(h) if cfg.final_norm else h).float()
  stacked = torch.stack([prem[j] for j in cands], dim=0)
  sm_mature = F.softmax(final, dim=-1)
  sm_prem = F.softmax(stacked, dim=-1)
  m = 0.5 * (sm_mature[None] + sm_prem)
  kl1 = F.kl_div(F.log_softmax(final, dim=-1)[None], m, reduction="none").mean(-1)
  kl2 = F.kl_div(F.log_softmax(stacked, dim=-1), m, reduction="none").mean(-1)
  js = (0.5 * (kl1 + kl2)).mean(-1)  # batch of one
  base = prem[cands[int(js.argmax().item())]]
  final_ls = final.log_softmax(dim=-1)
  diff = final_ls - base.log_softmax(dim=-1)
  # get_relative_top_filter of the official code
  normed = final_ls.log_softmax(dim=-1)
  sorted_logits, _ = torch.sort(normed, descending=True)
  thresh = torch.min(sorted_logits[..., 0], normed.max(dim=-1).values + np.log(cfg.relative_top)).unsqueeze(-1)
  diff = torch.where(normed < thresh, torch.tensor(cfg.relative_top_value), diff)
  from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

  return RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(seq, diff)


# -- PAI ----------------------------------------------------------------------------------------------------------


class _PAIState:
  active = False
  cfg = None
  layers: set = set()
  image_cols: tuple = (0, 0)


@contextlib.contextmanager
def pai_patch(cfg, num_layers: int, image_cols: tuple[int, int]):
  """Official llama_new_forward: last row, image columns: w = |w| * alpha + w, after the mask (layers in range)."""
  import transformers.models.llama.modeling_llama as ml

  start, stop = cfg.layers
  if cfg.layer_ref is not None:
    start2 = min(int(math.floor(start * num_layers / cfg.layer_ref + 0.5)), num_layers - 1)
    stop2 = int(math.floor(stop * num_layers / cfg.layer_ref + 0.5))
    start, stop = start2, min(max(stop2, start2 + 1), num_layers)
  _PAIState.layers, _PAIState.image_cols, _PAIState.cfg = set(range(start, stop)), image_cols, cfg
  def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    del kwargs
    k = ml.repeat_kv(key, module.num_key_value_groups)
    v = ml.repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    if attention_mask is not None:
      w = torch.max(w + attention_mask, torch.tensor(torch.finfo(w.dtype).min))
    if _PAIState.active and module.layer_idx in _PAIState.layers:
      a, b = _PAIState.image_cols
      w[:, :, -1, a:b] = w[:, :, -1, a:b].abs() * _PAIState.cfg.alpha + w[:, :, -1, a:b]
    p = torch.softmax(w, dim=-1, dtype=torch.float32)
    return torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous(), p

  with _eager_attention(patched):
    yield


def pai_step(main: _Cached, text: _Cached, cfg, last_token):
  # The official layers' `use_cfg` flag: set by llama_modify when the text-only view is on, cleared by CFGLogits
  # after its first call (never when gamma is 1); it disables the amplification. The paper amplifies every step.
  first = last_token is None
  _PAIState.active = not (getattr(cfg, "official_prefill", False) and cfg.use_cfg and (first or cfg.gamma == 1))
  try:
    scores = main.logits(last_token)
  finally:
    _PAIState.active = False
  scores = F.log_softmax(scores, dim=-1)
  if cfg.gamma == 1:
    return scores
  uncond = F.log_softmax(text.logits(last_token), dim=-1)
  cutoff = torch.log(torch.tensor(cfg.plausibility)) + scores.max(dim=-1, keepdim=True).values
  out = cfg.gamma * (scores - uncond) + uncond
  return out.masked_fill(scores < cutoff, -float("inf"))


# -- FarSight (our reading) ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def farsight_patch(cfg, total_len: int):
  """Row i gets virtual register columns with logits -d * sigma, d = 1 .. total_len - 1 - i, in the softmax;
  they are dropped afterwards. sigma = log(total_len) / log(alpha)."""
  import transformers.models.llama.modeling_llama as ml

  sigma = math.log(total_len) / math.log(cfg.alpha)

  def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    del kwargs
    k = ml.repeat_kv(key, module.num_key_value_groups)
    v = ml.repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    q_len, k_len = w.shape[-2], w.shape[-1]
    causal = torch.tril(torch.ones(q_len, k_len, dtype=torch.bool), diagonal=k_len - q_len)
    w = w.masked_fill(~causal, -float("inf"))
    n_reg = total_len - 1
    regs = torch.full((q_len, n_reg), -float("inf"))
    for r in range(q_len):
      i = k_len - q_len + r
      for d in range(1, total_len - i):
        regs[r, d - 1] = -d * sigma
    ext = torch.cat([w, regs.expand(w.shape[0], w.shape[1], q_len, n_reg)], dim=-1)
    p = torch.softmax(ext, dim=-1)[..., :k_len]
    return torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous(), p

  with _eager_attention(patched if cfg.enabled else None):
    yield


# -- FarSight (official farsight_attention_forward_v2) -------------------------------------------------------------


@contextlib.contextmanager
def farsight_official_patch(cfg):
  """The official forward for one unpadded sequence of length L (no cache): W = scores * C + P with
  P = 0.5 P_basic + 0.5 P_prog + P_alibi on the upper triangle, softmax(W) * C."""
  import transformers.models.llama.modeling_llama as ml

  def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    del kwargs, attention_mask  # the official SDPA-path run gets no mask for one unpadded sequence
    k = ml.repeat_kv(key, module.num_key_value_groups)
    v = ml.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    n_heads, length = scores.shape[1], scores.shape[-1]
    assert scores.shape[-2] == length, "the official forward runs without a cache"
    c = torch.tril(torch.ones(length, length))
    idx = torch.arange(length, dtype=torch.float32)
    delta = idx[None, :] - idx[:, None]
    upper = torch.triu(torch.ones(length, length), diagonal=1)
    basic = -(cfg.sigma * F.relu(delta)) * upper
    prog = -(cfg.sigma * (1.0 - idx[:, None] / max(length - 1, 1) * 0.5)) * F.relu(delta) * upper
    p_total = (0.5 * basic + 0.5 * prog).view(1, 1, length, length)
    if cfg.alibi:
      slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)]).view(1, n_heads, 1, 1)
      p_total = p_total - (F.relu(delta) * upper).view(1, 1, length, length) * slopes
    w = scores * c + p_total
    probs = torch.softmax(w, dim=-1) * c
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous(), probs

  with _eager_attention(patched):
    yield


@torch.no_grad()
def greedy_farsight_official(model, ids: np.ndarray, pixels: np.ndarray, cfg, n: int):
  """Official FarSight decoding of one example: every step a full forward without a cache."""
  seq = torch.as_tensor(ids, dtype=torch.long)
  pix = torch.as_tensor(pixels)
  tokens, logits = [], []
  with farsight_official_patch(cfg):
    for _ in range(n):
      out = _forward(model, seq, pix, use_cache=False).logits[0, -1].float()
      tok = int(out.argmax())
      tokens.append(tok)
      logits.append(out.numpy())
      seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
  return np.array(tokens), np.stack(logits)


# -- the loop ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(model, ids: np.ndarray, pixels: np.ndarray, cfg, n: int, *, image_token_id: int, eps=None):
  """Greedy decoding of one example with method `cfg` (a VCDConfig, DoLaConfig, PAIConfig or FarSightConfig)."""
  seq = torch.as_tensor(ids, dtype=torch.long)
  pix = torch.as_tensor(pixels)
  name = type(cfg).__name__
  ctx = contextlib.nullcontext()
  img_pos = np.nonzero(ids[0] == image_token_id)[0]
  if name == "PAIConfig":
    ctx = pai_patch(cfg, model.config.text_config.num_hidden_layers, (int(img_pos[0]), int(img_pos[-1]) + 1))
  elif name == "FarSightConfig":
    ctx = farsight_patch(cfg, ids.shape[1] + n)
  tokens, logits = [], []
  main = _Cached(model, seq, pix)
  other = None
  if name == "PAIConfig":
    other = _Cached(model, seq[:, torch.as_tensor(ids[0] != image_token_id)], None)
  elif name == "VCDConfig":
    other = _Cached(model, seq, vcd_noised(pix, torch.as_tensor(np.array(eps)), cfg.noise_step))
  with ctx:
    for _ in range(n):
      last = tokens[-1] if tokens else None
      if name == "VCDConfig":
        out = vcd_step(main, other, cfg, last)
      elif name == "DoLaConfig":
        out = dola_step(main, cfg, last)
      elif name == "PAIConfig":
        out = pai_step(main, other, cfg, last)
      else:
        out = main.logits(last)
      tok = int(out[0].argmax())
      tokens.append(tok)
      logits.append(out[0].numpy())
  return np.array(tokens), np.stack(logits)
