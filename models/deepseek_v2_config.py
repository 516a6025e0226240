"""DeepSeek-V2 decoder config (transformers `DeepseekV2Config` / the official `language_config` of DeepSeek-VL2).

Field names follow transformers. Only what the forward pass needs is kept; unsupported values raise a ValueError
naming the field. Official-only fields (`scoring_func`, `norm_topk_prob`, `noaux_tc`) are parsed and applied as the
official code does; transformers' DeepseekV2 has no such switches (it behaves as softmax scoring without
normalisation), so parity with transformers is tested on those defaults.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from models.config import _ACTIVATIONS, RopeConfig, TextConfig, _check, _rope_from_dict
from models.moe import Router

_TOPK = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass(frozen=True)
class DeepseekRope:
  """RoPE of the decoupled key/query part: default, linear or yarn (transformers' formulas)."""

  rope_type: str = "default"
  rope_theta: float = 10000.0
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True
  # The official DeepSeek-VL2 code's yarn factor is always mscale(f, mscale) / mscale(f, mscale_all_dim) (defaults 1
  # and 0); transformers' takes that ratio only when both are set. They differ when a config sets only one.
  official_yarn: bool = False


@dataclasses.dataclass(frozen=True)
class DeepseekV2TextConfig:
  """The DeepSeek-V2 decoder: MLA attention, dense first layers, then shared + routed experts."""

  vocab_size: int = 102400
  hidden_size: int = 4096
  intermediate_size: int = 11008
  moe_intermediate_size: int = 1407
  num_hidden_layers: int = 30
  num_attention_heads: int = 32
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 0
  topk_method: str = "greedy"
  n_group: int | None = None
  topk_group: int | None = None
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  scoring_func: str = "softmax"
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  rope: DeepseekRope = DeepseekRope()
  bos_token_id: int | None = 1
  eos_token_id: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  # use_mla = False (official DeepSeek-VL2-Tiny): plain GQA attention, transformers' LlamaAttention with q/k/v/o
  # projections, rotate-half RoPE over the whole head (Llama rope types) and kv_heads key/value heads.
  use_mla: bool = True
  kv_heads: int | None = None
  mha_head_dim: int | None = None
  mha_rope: RopeConfig = RopeConfig()

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def head_dim(self) -> int:
    """The query/key head width (what an attention score reads)."""
    return self.qk_head_dim if self.use_mla else self.mha_head_dim

  @property
  def num_key_value_heads(self) -> int:
    # MLA: after the latent up-projection every head has its own key and value.
    return self.num_attention_heads if self.use_mla else self.kv_heads

  @property
  def llama_view(self) -> TextConfig:
    """The MHA variant's attention as a Llama TextConfig (for models.rope)."""
    return TextConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                      max_position_embeddings=self.max_position_embeddings, rope=self.mha_rope)

  def is_moe(self, layer: int) -> bool:
    return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

  @property
  def router(self) -> Router:
    """The routing of the MoE layers (models.moe): float32 router logits, DeepSeek's normalisation."""
    return Router(num_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                  hidden_act=self.hidden_act, scoring_func=self.scoring_func, topk_method=self.topk_method,
                  n_group=self.n_group, topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                  routed_scaling_factor=self.routed_scaling_factor, deepseek_norm=True, float32_logits=True)

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 for scaled rope (transformers)."""
    scale = self.qk_head_dim**-0.5
    r = self.rope
    if r.rope_type != "default" and r.mscale_all_dim:
      m = _yarn_mscale(r.factor, r.mscale_all_dim)
      scale = scale * m * m
    return scale


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: DeepseekV2TextConfig) -> tuple[np.ndarray, float]:
  """(inverse frequencies [Dr / 2] float32, cos/sin attention factor) as transformers computes them."""
  r, dim = cfg.rope, cfg.qk_rope_head_dim
  base = np.float32(r.rope_theta)
  exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = base**exps
  if r.rope_type == "default":
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  if r.rope_type == "linear":
    return (1.0 / pos_freqs / np.float32(r.factor)).astype(np.float32), 1.0
  # yarn
  factor = r.factor
  orig = r.original_max_position_embeddings
  att = r.attention_factor
  if att is None:
    if r.official_yarn:
      att = float(_yarn_mscale(factor, 1.0 if r.mscale is None else r.mscale)
                  / _yarn_mscale(factor, 0.0 if r.mscale_all_dim is None else r.mscale_all_dim))
    elif r.mscale and r.mscale_all_dim:
      att = float(_yarn_mscale(factor, r.mscale) / _yarn_mscale(factor, r.mscale_all_dim))
    else:
      att = _yarn_mscale(factor)

  def corr_dim(rot):
    return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(r.rope_theta))

  low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
  if r.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extra = 1.0 - ramp.astype(np.float32)
  inv_extra = (1.0 / pos_freqs).astype(np.float32)
  inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
  return (inv_inter * (1 - extra) + inv_extra * extra).astype(np.float32), float(att)


def _rope(d: dict, max_pos: int, official_yarn: bool = False) -> DeepseekRope:
  params = dict(d.get("rope_parameters") or {})
  for k, v in (d.get("rope_scaling") or {}).items():
    params.setdefault(k, v)
  if "type" in params and "rope_type" not in params:
    params["rope_type"] = params["type"]
  rope_type = params.get("rope_type", "default")
  _check(rope_type in ("default", "linear", "yarn"), "rope_parameters.rope_type", rope_type,
         "'default', 'linear' or 'yarn'")
  orig = params.get("original_max_position_embeddings")
  factor = params.get("factor")
  if rope_type == "yarn":
    _check(orig is not None, "rope_parameters.original_max_position_embeddings", orig, "an int for yarn")
    if factor is None:
      factor = max_pos / orig
  if rope_type == "linear":
    _check(factor is not None, "rope_parameters.factor", factor, "a number for linear rope")
  opt = lambda k: None if params.get(k) is None else float(params[k])  # noqa: E731
  return DeepseekRope(
      rope_type=rope_type, rope_theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
      factor=float(factor if factor is not None else 1.0),
      original_max_position_embeddings=int(orig) if orig is not None else None,
      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
      mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"), attention_factor=opt("attention_factor"),
      truncate=bool(params.get("truncate", True)), official_yarn=official_yarn)


def deepseek_v2_config_from_dict(d: dict, field: str = "language_config",
                                 official: bool = False) -> DeepseekV2TextConfig:
  """Parses a transformers DeepseekV2 config dict or (official = True) the official DeepSeek-VL2 `language_config`,
  whose yarn attention factor follows the official code (`DeepseekRope.official_yarn`)."""
  mt = d.get("model_type", "deepseek_v2")
  _check(mt == "deepseek_v2", f"{field}.model_type", mt, "'deepseek_v2'")
  use_mla = d.get("use_mla", True) is not False
  act = d.get("hidden_act", "silu")
  _check(act in _ACTIVATIONS, f"{field}.hidden_act", act, f"one of {_ACTIVATIONS}")
  topk = d.get("topk_method", "greedy")
  _check(topk in _TOPK, f"{field}.topk_method", topk, f"one of {_TOPK}")
  scoring = d.get("scoring_func", "softmax")
  _check(scoring in ("softmax", "sigmoid"), f"{field}.scoring_func", scoring, "'softmax' or 'sigmoid'")
  n_exp = d.get("n_routed_experts") or 0
  n_group, topk_group = d.get("n_group"), d.get("topk_group")
  if topk in ("group_limited_greedy", "noaux_tc"):
    _check(n_group and n_exp % int(n_group) == 0, f"{field}.n_group", n_group, f"a divisor of n_routed_experts={n_exp}")
    _check(topk_group and int(topk_group) <= int(n_group), f"{field}.topk_group", topk_group, f"<= n_group={n_group}")
  heads = int(d.get("num_attention_heads", 32))
  kvh = d.get("num_key_value_heads") or heads
  if use_mla:
    _check(int(kvh) == heads, f"{field}.num_key_value_heads", kvh, f"equal to num_attention_heads={heads} (MLA)")
    for name, default in (("qk_rope_head_dim", 64), ("v_head_dim", 128), ("kv_lora_rank", 512)):
      value = d.get(name, default)
      if name == "kv_lora_rank" and value is None:
        continue  # None takes the default (512)
      _check(isinstance(value, int) and value > 0, f"{field}.{name}", value, "a positive integer (MLA)")
    _check(int(d.get("qk_rope_head_dim", 64)) % 2 == 0, f"{field}.qk_rope_head_dim", d.get("qk_rope_head_dim"),
           "even (rotary pairs)")
  else:
    _check(heads % int(kvh) == 0, f"{field}.num_key_value_heads", kvh, f"a divisor of num_attention_heads={heads}")
  max_pos = int(d.get("max_position_embeddings", 2048))
  eos = d.get("eos_token_id", 2)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  q_lora = d.get("q_lora_rank", 1536)
  # The official decoder makes layer l a MoE layer only when l % moe_layer_freq == 0 (beyond first_k_dense_replace);
  # every released DeepSeek-V2 / VL2 config uses 1, the only value supported here.
  freq = d.get("moe_layer_freq", 1)
  _check(freq in (1, None), f"{field}.moe_layer_freq", freq, "1 (every layer past first_k_dense_replace is MoE)")
  return DeepseekV2TextConfig(
      vocab_size=int(d.get("vocab_size", 102400)), hidden_size=int(d.get("hidden_size", 4096)),
      intermediate_size=int(d.get("intermediate_size", 11008)),
      moe_intermediate_size=int(d.get("moe_intermediate_size", 1407)),
      num_hidden_layers=int(d.get("num_hidden_layers", 30)), num_attention_heads=heads,
      q_lora_rank=None if q_lora is None else int(q_lora), kv_lora_rank=int(d.get("kv_lora_rank") or 0) if not use_mla else int(d.get("kv_lora_rank") or 512),
      qk_nope_head_dim=int(d.get("qk_nope_head_dim", 128)), qk_rope_head_dim=int(d.get("qk_rope_head_dim", 64)),
      v_head_dim=int(d.get("v_head_dim", 128)), n_routed_experts=int(n_exp),
      n_shared_experts=int(d.get("n_shared_experts") or 0), num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
      first_k_dense_replace=int(d.get("first_k_dense_replace", 0)), topk_method=topk,
      n_group=None if n_group is None else int(n_group), topk_group=None if topk_group is None else int(topk_group),
      routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
      norm_topk_prob=bool(d.get("norm_topk_prob", False)), scoring_func=scoring, hidden_act=act,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), max_position_embeddings=max_pos,
      attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      rope=_rope(d, max_pos, official_yarn=official) if use_mla else DeepseekRope(),
      use_mla=use_mla, kv_heads=int(kvh),
      mha_head_dim=int(d.get("head_dim") or int(d.get("hidden_size", 4096)) // heads),
      mha_rope=RopeConfig() if use_mla else _rope_from_dict(d, 10000.0, max_pos),
      bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos, pad_token_id=d.get("pad_token_id"))
