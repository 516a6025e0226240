"""Qwen2 / Qwen3 decoder configs (the Llama decoder of models.llama with Qwen's options) and their param shapes.

Qwen2 (and the Qwen2.5-VL text model): biases on q/k/v only, optional multimodal RoPE sections. Qwen3: q/k
RMSNorm over head_dim before RoPE, `attention_bias` on all four projections. Sliding-window attention is refused
(the released checkpoints have `use_sliding_window: false`; transformers' eager path ignores it as well).
"""

from __future__ import annotations

import dataclasses

from models.config import TextConfig, _check, _rope_from_dict, text_config_from_dict

QWEN2_TYPES = ("qwen2", "qwen2_5_vl_text", "qwen2_vl_text")
QWEN3_TYPES = ("qwen3",)


def qwen_text_config_from_dict(d: dict, *, tie_default: bool = False, field: str = "text_config") -> TextConfig:
  """Parses a Qwen2 / Qwen3 (or Qwen2.5-VL text) config dict into a TextConfig.

  Multimodal RoPE: `rope_parameters.mrope_section` (5.x) or `rope_scaling = {"type": "mrope", ...}` (4.x).
  """
  model_type = d.get("model_type", "qwen2")
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
  return dataclasses.replace(
      base,
      rope=_rope_from_dict({"rope_parameters": rope_params, "rope_theta": d.get("rope_theta", theta)},
                           theta, base.max_position_embeddings),
      attention_bias=bool(d.get("attention_bias", False)) if qwen3 else False,
      qkv_bias=not qwen3,
      qk_norm=qwen3,
      mrope_section=mrope,
      model_type=model_type,
  )


def decoder_param_shapes(t: TextConfig) -> dict:
  """The decoder param tree (transformers names, stacked layers) as (shape tuple) leaves, lm_head excluded."""
  lt, h, d = t.num_hidden_layers, t.hidden_size, t.head_dim
  qo, kvo = t.num_attention_heads * d, t.num_key_value_heads * d

  def lin(o, i, bias):
    return {"weight": (lt, o, i), "bias": (lt, o)} if bias else {"weight": (lt, o, i)}

  qkv_b = t.attention_bias or t.qkv_bias
  attn = {"q_proj": lin(qo, h, qkv_b), "k_proj": lin(kvo, h, qkv_b), "v_proj": lin(kvo, h, qkv_b),
          "o_proj": lin(h, qo, t.attention_bias)}
  if t.qk_norm:
    attn["q_norm"] = {"weight": (lt, d)}
    attn["k_norm"] = {"weight": (lt, d)}
  return {
      "embed_tokens": {"weight": (t.vocab_size, h)},
      "layers": {
          "input_layernorm": {"weight": (lt, h)}, "post_attention_layernorm": {"weight": (lt, h)},
          "self_attn": attn,
          "mlp": {"gate_proj": lin(t.intermediate_size, h, t.mlp_bias), "up_proj": lin(t.intermediate_size, h, t.mlp_bias),
                  "down_proj": lin(h, t.intermediate_size, t.mlp_bias)},
      },
      "norm": {"weight": (h,)},
  }
