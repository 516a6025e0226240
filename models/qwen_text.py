"""Qwen2 / Qwen3 / Qwen3-MoE decoder configs (the Llama decoder of models.llama with Qwen's options) and their
param shapes.

Qwen2 (and the Qwen2.5-VL text model): biases on q/k/v only, optional multimodal RoPE sections. Qwen3: q/k
RMSNorm over head_dim before RoPE, `attention_bias` on all four projections. Qwen3-MoE (transformers
`Qwen3MoeModel`): Qwen3 attention; layer i has the sparse MoE block (router `mlp.gate`, `num_experts` experts of
width `moe_intermediate_size`, softmax top-`num_experts_per_tok`, renormalised when `norm_topk_prob`, no shared
experts) when i is not in `mlp_only_layers`, num_experts > 0 and (i + 1) % decoder_sparse_step == 0, else a dense
MLP of `intermediate_size`. Sliding-window attention is refused (the released checkpoints have
`use_sliding_window: false`; transformers' eager path ignores it as well).
"""

from __future__ import annotations

import dataclasses

from models import moe as moe_lib
from models.config import TextConfig, _check, _rope_from_dict, text_config_from_dict
from models.moe import Router

QWEN2_TYPES = ("qwen2", "qwen2_5_vl_text", "qwen2_vl_text")
QWEN3_TYPES = ("qwen3", "qwen3_moe")
# Qwen3MoeConfig's defaults for fields a config.json leaves out (the Llama parser's defaults differ).
_QWEN3_MOE_DEFAULTS = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 32768}


def qwen_text_config_from_dict(d: dict, *, tie_default: bool = False, field: str = "text_config") -> TextConfig:
  """Parses a Qwen2 / Qwen3 / Qwen3-MoE (or Qwen2.5-VL text) config dict into a TextConfig.

  Multimodal RoPE: `rope_parameters.mrope_section` (5.x) or `rope_scaling = {"type": "mrope", ...}` (4.x).
  """
  model_type = d.get("model_type", "qwen2")
  if model_type == "qwen3_moe":
    d = {**_QWEN3_MOE_DEFAULTS, **d}
  _check(model_type in QWEN2_TYPES + QWEN3_TYPES, f"{field}.model_type", model_type,
         f"one of {QWEN2_TYPES + QWEN3_TYPES}")
  if d.get("use_sliding_window", False):
    raise ValueError(f"config field '{field}.use_sliding_window' is true; sliding-window attention is not supported "
                     "for Qwen decoders (set it to false, as in the released checkpoints)")
  rope_params = dict(d.get("rope_parameters") or {})
  for k, v in (d.get("rope_scaling") or {}).items():
    rope_params.setdefault(k, v)
  mrope = rope_params.pop("mrope_section", None)
  kind = rope_params.get("rope_type", rope_params.get("type"))
  if kind in ("mrope", "default"):  # "mrope" is the 4.x spelling of default frequencies + sections
    rope_params["rope_type"] = "default"
    rope_params.pop("type", None)
  # Defaults of the transformers config classes for fields a config.json leaves out: Qwen2 / Qwen3 theta 1e4 and
  # eps 1e-6 (Qwen2Config, Qwen3Config), the Qwen2(.5)-VL text model theta 1e6 and eps 1e-5.
  theta, eps = (10000.0, 1e-6) if model_type in ("qwen2",) + QWEN3_TYPES else (1000000.0, 1e-5)
  llama_like = dict(d, model_type="llama", rope_parameters=rope_params or None, rope_scaling=None)
  llama_like.setdefault("rms_norm_eps", eps)
  base = text_config_from_dict(llama_like, tie_default=tie_default)
  qwen3 = model_type in QWEN3_TYPES
  if mrope is not None:
    mrope = tuple(int(x) for x in mrope)
    _check(sum(mrope) == base.head_dim // 2, f"{field}.rope_parameters.mrope_section", list(mrope),
           f"sections summing to head_dim // 2 = {base.head_dim // 2}")
  moe = _qwen3_moe(d, base.num_hidden_layers, base.hidden_act, field) if model_type == "qwen3_moe" else {}
  return dataclasses.replace(
      base,
      **moe,
      rope=_rope_from_dict({"rope_parameters": rope_params, "rope_theta": d.get("rope_theta", theta)},
                           theta, base.max_position_embeddings),
      attention_bias=bool(d.get("attention_bias", False)) if qwen3 else False,
      qkv_bias=not qwen3,
      qk_norm=qwen3,
      mrope_section=mrope,
      model_type=model_type,
  )


def _qwen3_moe(d: dict, num_layers: int, act: str, field: str) -> dict:
  """The TextConfig fields of Qwen3-MoE's sparse layers (Qwen3MoeConfig defaults for missing fields)."""
  # transformers 5.x saves `num_experts` under its attribute_map name `num_local_experts`.
  n_exp = int(d.get("num_experts", d.get("num_local_experts", 128)))
  k = int(d.get("num_experts_per_tok", 8))
  step = int(d.get("decoder_sparse_step", 1))
  only = tuple(int(i) for i in (d.get("mlp_only_layers") or ()))
  _check(n_exp >= 0, f"{field}.num_experts", n_exp, "a non-negative int")
  _check(step >= 1, f"{field}.decoder_sparse_step", step, "a positive int")
  _check(n_exp == 0 or 1 <= k <= n_exp, f"{field}.num_experts_per_tok", k, f"between 1 and num_experts = {n_exp}")
  sparse = tuple(i for i in range(num_layers) if i not in only and n_exp > 0 and (i + 1) % step == 0)
  if not sparse:
    return {}
  router = Router(num_experts=n_exp, num_experts_per_tok=k, hidden_act=act,
                  norm_topk_prob=bool(d.get("norm_topk_prob", False)), deepseek_norm=False, float32_logits=False)
  return dict(moe=router, moe_intermediate_size=int(d.get("moe_intermediate_size", 768)), sparse_layers=sparse)


def _layer_shapes(t: TextConfig, sparse: bool, lead: tuple) -> dict:
  """One decoder layer's param shapes with leading axes `lead` ((L,) stacked, () per layer)."""
  h, d = t.hidden_size, t.head_dim
  qo, kvo = t.num_attention_heads * d, t.num_key_value_heads * d

  def lin(o, i, bias):
    return {"weight": lead + (o, i), "bias": lead + (o,)} if bias else {"weight": lead + (o, i)}

  qkv_b = t.attention_bias or t.qkv_bias
  attn = {"q_proj": lin(qo, h, qkv_b), "k_proj": lin(kvo, h, qkv_b), "v_proj": lin(kvo, h, qkv_b),
          "o_proj": lin(h, qo, t.attention_bias)}
  if t.qk_norm:
    attn["q_norm"] = {"weight": lead + (d,)}
    attn["k_norm"] = {"weight": lead + (d,)}
  if sparse:
    mlp = moe_lib.expert_shapes(t.moe.num_experts, t.moe_intermediate_size, h, lead)
  else:
    w = t.intermediate_size
    mlp = {"gate_proj": lin(w, h, t.mlp_bias), "up_proj": lin(w, h, t.mlp_bias), "down_proj": lin(h, w, t.mlp_bias)}
  return {"input_layernorm": {"weight": lead + (h,)}, "post_attention_layernorm": {"weight": lead + (h,)},
          "self_attn": attn, "mlp": mlp}


def decoder_param_shapes(t: TextConfig) -> dict:
  """The decoder param tree (transformers names) as (shape tuple) leaves, lm_head excluded.

  Layers are stacked on a leading L axis when they all have the same params (all dense, or all sparse with experts
  [L, X, I, E]); with both kinds (`t.mixed_layers`) they are a tuple of per-layer trees.
  """
  lt, h = t.num_hidden_layers, t.hidden_size
  if t.mixed_layers:
    layers = tuple(_layer_shapes(t, t.is_sparse(i), ()) for i in range(lt))
  else:
    layers = _layer_shapes(t, bool(t.sparse_layers), (lt,))
  return {"embed_tokens": {"weight": (t.vocab_size, h)}, "layers": layers, "norm": {"weight": (h,)}}
