"""BLIP-2 / InstructBLIP ViT (transformers `InstructBlipVisionModel`): CLIP-like, with a fused qkv projection.

Params (transformers names, encoder layers stacked on a leading axis L):
  embeddings.{class_embedding [1, 1, E], patch_embedding.{weight [E, C, p, p], bias [E]},
              position_embedding [1, N+1, E]}
  encoder.layers.{layer_norm1, self_attn.{qkv.{weight [3E, E], bias? [3E]}, projection}, layer_norm2, mlp.{fc1, fc2}}
  post_layernorm
The checkpoint's qkv bias is (q_bias, 0, v_bias) concatenated, stored as one vector, used as is.
Legend: B images, N patches (+1 CLS), E width, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.layers import activation, layer_norm, linear


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def patchify(pixel_values: jax.Array, w: jax.Array, bias: jax.Array | None) -> jax.Array:
  """A stride-p convolution without overlap as a matmul: [B, C, H, W] -> [B, (H/p)(W/p), E] (row-major patches)."""
  b, c, h, wd = pixel_values.shape
  p = w.shape[-1]
  gh, gw = h // p, wd // p
  x = pixel_values.astype(w.dtype)[:, :, : gh * p, : gw * p]
  x = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
  out = jnp.einsum("bnk,ek->bne", x, w.reshape(w.shape[0], -1))
  return out if bias is None else out + bias.astype(out.dtype)


def _layer(cfg: BlipVisionConfig, p: dict, x: jax.Array) -> jax.Array:
  b, n, e = x.shape
  nh, hd = cfg.num_attention_heads, cfg.head_dim
  y = layer_norm(p["layer_norm1"], x, cfg.layer_norm_eps)
  qkv = linear(p["self_attn"]["qkv"], y).reshape(b, n, 3, nh, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
  o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, e)
  x = x + linear(p["self_attn"]["projection"], o)
  y = layer_norm(p["layer_norm2"], x, cfg.layer_norm_eps)
  return x + linear(p["mlp"]["fc2"], activation(cfg.hidden_act)(linear(p["mlp"]["fc1"], y)))


def forward(params: dict, cfg: BlipVisionConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [B, C, S, S] -> post-layernormed last hidden state [B, N+1, E]."""
  b, c, h, w = pixel_values.shape
  if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
    raise ValueError(f"pixel_values has shape {pixel_values.shape}; the vision config expects "
                     f"[batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
  emb = params["embeddings"]
  pe = emb["patch_embedding"]
  x = patchify(pixel_values, pe["weight"], pe.get("bias"))
  cls = jnp.broadcast_to(emb["class_embedding"].reshape(1, 1, -1).astype(x.dtype), (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + emb["position_embedding"].reshape(1, -1, x.shape[-1]).astype(x.dtype)
  x, _ = jax.lax.scan(lambda h, p: (_layer(cfg, p, h), None), x, params["encoder"]["layers"])
  return layer_norm(params["post_layernorm"], x, cfg.layer_norm_eps)


def param_shapes(cfg: BlipVisionConfig) -> dict:
  e, n, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
  ln = {"weight": (n, e), "bias": (n, e)}
  qkv = {"weight": (n, 3 * e, e)}
  if cfg.qkv_bias:
    qkv["bias"] = (n, 3 * e)
  return {
      "embeddings": {"class_embedding": (1, 1, e),
                     "patch_embedding": {"weight": (e, cfg.num_channels, cfg.patch_size, cfg.patch_size), "bias": (e,)},
                     "position_embedding": (1, cfg.num_patches + 1, e)},
      "encoder": {"layers": {"layer_norm1": ln, "layer_norm2": dict(ln),
                             "self_attn": {"qkv": qkv, "projection": {"weight": (n, e, e), "bias": (n, e)}},
                             "mlp": {"fc1": {"weight": (n, i, e), "bias": (n, i)},
                                     "fc2": {"weight": (n, e, i), "bias": (n, e)}}}},
      "post_layernorm": {"weight": (e,), "bias": (e,)},
  }
