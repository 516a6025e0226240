"""CLIP ViT vision tower as transformers' `CLIPVisionTransformer` defines it.

Params (transformers names, encoder layers stacked on a leading axis):
  embeddings.{class_embedding [E], patch_embedding.weight [E, C, p, p], position_embedding.weight [N+1, E]}
  pre_layrnorm, encoder.layers.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1, fc2}}, post_layernorm
Legend: B images, N patches (+1 with CLS), E width, C channels, p patch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import VisionConfig
from models.layers import activation, layer_norm, linear


def embed(params: dict, cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
  """Patch + class + position embeddings: pixel_values [B, C, H, W] -> [B, N+1, E]."""
  emb = params["embeddings"]
  w = emb["patch_embedding"]["weight"]  # [E, C, p, p]
  dtype = w.dtype
  b, c, h, wd = pixel_values.shape
  if (h, wd) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
    raise ValueError(
        f"pixel_values has shape {pixel_values.shape}; the vision config expects "
        f"[batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
  p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
  x = pixel_values.astype(dtype)[:, :, : g * p, : g * p]
  # A stride-p convolution without overlap is a matmul over flattened patches (C, p, p order as the kernel).
  x = x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
  patches = jnp.einsum("bnk,ek->bne", x, w.reshape(w.shape[0], -1))
  cls = jnp.broadcast_to(emb["class_embedding"].astype(dtype), (b, 1, w.shape[0]))
  x = jnp.concatenate([cls, patches], axis=1)
  return x + emb["position_embedding"]["weight"].astype(dtype)[None]


def encoder_layer(cfg, p: dict, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """One pre-norm CLIP encoder layer on x [B, N, E]; `mask` [B, 1, N, N] is added to the scores (text side)."""
  b, n, e = x.shape
  nh, hd = cfg.num_attention_heads, cfg.head_dim
  h = layer_norm(p["layer_norm1"], x, cfg.layer_norm_eps)
  a = p["self_attn"]
  q = linear(a["q_proj"], h).reshape(b, n, nh, hd)
  k = linear(a["k_proj"], h).reshape(b, n, nh, hd)
  v = linear(a["v_proj"], h).reshape(b, n, nh, hd)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
  if mask is not None:
    scores = scores.astype(jnp.float32) + mask
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
  o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, e)
  x = x + linear(a["out_proj"], o)
  h = layer_norm(p["layer_norm2"], x, cfg.layer_norm_eps)
  h = linear(p["mlp"]["fc2"], activation(cfg.hidden_act)(linear(p["mlp"]["fc1"], h)))
  return x + h


def forward(params: dict, cfg: VisionConfig, pixel_values: jax.Array, num_layers: int | None = None) -> jax.Array:
  """Hidden states of every layer, [num_layers + 1, B, N+1, E].

  Index 0 is the pre-layernorm output (transformers' `hidden_states[0]`), index i the output of layer i. With
  `num_layers` smaller than the config's, the remaining layers are skipped (they cannot affect the result).
  """
  n = cfg.num_hidden_layers if num_layers is None else num_layers
  pre = params["pre_layrnorm"] if "pre_layrnorm" in params else params["pre_layernorm"]  # CLIP's typo vs OWL's
  x = layer_norm(pre, embed(params, cfg, pixel_values), cfg.layer_norm_eps)
  layers = jax.tree.map(lambda w: w[:n], params["encoder"]["layers"])

  def step(h, p):
    h = encoder_layer(cfg, p, h)
    return h, h

  _, hs = jax.lax.scan(step, x, layers)
  return jnp.concatenate([x[None], hs], axis=0)
