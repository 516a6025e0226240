"""SigLIP vision tower (transformers `SiglipVisionModel` without its pooling head): patch embedding with bias, learned
absolute positions (no CLS token), CLIP-style pre-LN encoder layers, post_layernorm.

Params (transformers names, encoder layers stacked on a leading axis L):
  embeddings.{patch_embedding.{weight [E, C, p, p], bias [E]}, position_embedding.weight [N, E]}
  encoder.layers.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1, fc2}}, post_layernorm
The multihead-attention pooling head (`head.*`) is not part of the tree: vision-language models read the patch
features (DeepSeek-VL2 builds its tower with `ignore_head=True`), so loaders skip those keys by name.
Legend: B images, N patches, E width.
"""

from __future__ import annotations

import dataclasses

import jax

from models.blip_vision import patchify
from models.clip import encoder_layer as _encoder_layer
from models.layers import layer_norm


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 384
  patch_size: int = 14
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def forward(params: dict, cfg: SiglipVisionConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [B, C, S, S] -> last hidden state after post_layernorm [B, N, E]."""
  b, c, h, w = pixel_values.shape
  if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
    raise ValueError(f"pixel_values has shape {pixel_values.shape}; the SigLIP config expects "
                     f"[batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
  emb = params["embeddings"]
  x = patchify(pixel_values, emb["patch_embedding"]["weight"], emb["patch_embedding"].get("bias"))
  x = x + emb["position_embedding"]["weight"].astype(x.dtype)[None]
  x, _ = jax.lax.scan(lambda y, p: (_encoder_layer(cfg, p, y), None), x, params["encoder"]["layers"])
  return layer_norm(params["post_layernorm"], x, cfg.layer_norm_eps)


def param_shapes(cfg: SiglipVisionConfig) -> dict:
  e, n, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size

  def lin(o, k):
    return {"weight": (n, o, k), "bias": (n, o)}

  return {
      "embeddings": {"patch_embedding": {"weight": (e, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                                         "bias": (e,)},
                     "position_embedding": {"weight": (cfg.num_patches, e)}},
      "encoder": {"layers": {"layer_norm1": {"weight": (n, e), "bias": (n, e)},
                             "layer_norm2": {"weight": (n, e), "bias": (n, e)},
                             "self_attn": {k: lin(e, e) for k in ("q_proj", "k_proj", "v_proj", "out_proj")},
                             "mlp": {"fc1": lin(i, e), "fc2": lin(e, i)}}},
      "post_layernorm": {"weight": (e,), "bias": (e,)},
  }
