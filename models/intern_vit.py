"""InternViT (transformers `InternVLVisionModel`): pre-norm ViT with layer scale, LayerNorm or RMSNorm, optional qk norm.

Params (transformers names, except that the stacked encoder layers are called `layers`: the checkpoint's
`encoder.layer.{i}.X` is `encoder.layers.X[i]`, see models.internvl.InternVLFamily.stack_renames):
  embeddings.{cls_token [1, 1, E], patch_embeddings.projection.{weight [E, C, p, p], bias [E]},
              position_embeddings [1, N+1, E] (if absolute), mask_token [1, 1, E] (if use_mask_token; unused here)}
  encoder.layers.{layernorm_before, attention.{q,k,v}_proj (+bias if attention_bias), attention.{q,k}_norm (if qk
                 norm), attention.projection_layer, layernorm_after, mlp.{fc1, fc2}, lambda_1 [E], lambda_2 [E]}
  layernorm (only when use_mean_pooling is false)
Legend: B tiles, N patches (+1 with CLS), E width, C channels, p patch size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.config import _check
from models.layers import activation, layer_norm, linear, rms_norm

_QK_EPS = 1e-6  # transformers' InternVLVisionRMSNorm default, used for q/k norm


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 448
  patch_size: int = 14
  hidden_act: str = "gelu"
  norm_type: str = "layer_norm"
  layer_norm_eps: float = 1e-6
  attention_bias: bool = True
  use_qk_norm: bool = False
  use_absolute_position_embeddings: bool = True
  use_mask_token: bool = False
  use_mean_pooling: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid**2


def _square(value, field: str) -> int:
  if isinstance(value, (list, tuple)):
    _check(len(value) == 2 and value[0] == value[1], field, value, "a square size (equal height and width)")
    value = value[0]
  return int(value)


def vision_config_from_dict(d: dict) -> InternVisionConfig:
  model_type = d.get("model_type", "internvl_vision")
  _check(model_type == "internvl_vision", "vision_config.model_type", model_type, "'internvl_vision' (InternViT)")
  norm = d.get("norm_type", "layer_norm")
  _check(norm in ("layer_norm", "rms_norm"), "vision_config.norm_type", norm, "'layer_norm' or 'rms_norm'")
  act = d.get("hidden_act", "gelu")
  activation(act)
  cfg = InternVisionConfig(
      hidden_size=int(d.get("hidden_size", 1024)),
      intermediate_size=int(d.get("intermediate_size", 4096)),
      num_hidden_layers=int(d.get("num_hidden_layers", 24)),
      num_attention_heads=int(d.get("num_attention_heads", 16)),
      num_channels=int(d.get("num_channels", 3)),
      image_size=_square(d.get("image_size", 448), "vision_config.image_size"),
      patch_size=_square(d.get("patch_size", 14), "vision_config.patch_size"),
      hidden_act=act,
      norm_type=norm,
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
      attention_bias=bool(d.get("attention_bias", False)),
      use_qk_norm=bool(d.get("use_qk_norm", False)),
      use_absolute_position_embeddings=bool(d.get("use_absolute_position_embeddings", True)),
      use_mask_token=bool(d.get("use_mask_token", False)),
      use_mean_pooling=bool(d.get("use_mean_pooling", True)),
  )
  _check(cfg.hidden_size % cfg.num_attention_heads == 0, "vision_config.num_attention_heads",
         cfg.num_attention_heads, f"a divisor of hidden_size={cfg.hidden_size}")
  _check(cfg.image_size % cfg.patch_size == 0, "vision_config.patch_size", cfg.patch_size,
         f"a divisor of image_size={cfg.image_size}")
  return cfg


def param_shapes(cfg: InternVisionConfig) -> dict:
  e, n, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size

  def lin(o, k, bias=True):
    return {"weight": (n, o, k), "bias": (n, o)} if bias else {"weight": (n, o, k)}

  def norm():
    return {"weight": (n, e), "bias": (n, e)} if cfg.norm_type == "layer_norm" else {"weight": (n, e)}

  attn = {k: lin(e, e, cfg.attention_bias) for k in ("q_proj", "k_proj", "v_proj")}
  attn["projection_layer"] = lin(e, e)
  if cfg.use_qk_norm:
    attn["q_norm"] = {"weight": (n, e)}
    attn["k_norm"] = {"weight": (n, e)}
  emb = {"cls_token": (1, 1, e),
         "patch_embeddings": {"projection": {"weight": (e, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                                             "bias": (e,)}}}
  if cfg.use_absolute_position_embeddings:
    emb["position_embeddings"] = (1, cfg.grid**2 + 1, e)
  if cfg.use_mask_token:
    emb["mask_token"] = (1, 1, e)
  tree = {"embeddings": emb,
          "encoder": {"layers": {"layernorm_before": norm(), "layernorm_after": norm(), "attention": attn,
                                "mlp": {"fc1": lin(i, e), "fc2": lin(e, i)}, "lambda_1": (n, e), "lambda_2": (n, e)}}}
  if not cfg.use_mean_pooling:
    tree["layernorm"] = {"weight": (e,), "bias": (e,)}
  return tree


def _norm(cfg: InternVisionConfig, p, x):
  return layer_norm(p, x, cfg.layer_norm_eps) if cfg.norm_type == "layer_norm" else rms_norm(p, x, cfg.layer_norm_eps)


def embed(params: dict, cfg: InternVisionConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [B, C, H, W] (H = W = image_size) -> [B, N+1, E]."""
  emb = params["embeddings"]
  proj = emb["patch_embeddings"]["projection"]
  w = proj["weight"]
  b, c, h, wd = pixel_values.shape
  if (h, wd) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
    raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; InternViT takes tiles [tiles, "
                     f"{cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] (use the InternVL image processor)")
  p, g = cfg.patch_size, cfg.grid
  x = pixel_values.astype(w.dtype).reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  x = jnp.einsum("bnk,ek->bne", x, w.reshape(w.shape[0], -1)) + proj["bias"].astype(w.dtype)
  cls = jnp.broadcast_to(emb["cls_token"].astype(w.dtype), (b, 1, w.shape[0]))
  x = jnp.concatenate([cls, x], axis=1)
  if cfg.use_absolute_position_embeddings:
    x = x + emb["position_embeddings"].astype(w.dtype)
  return x


def _layer(cfg: InternVisionConfig, p: dict, x: jax.Array) -> jax.Array:
  b, n, e = x.shape
  nh, hd = cfg.num_attention_heads, cfg.head_dim
  a = p["attention"]
  h = _norm(cfg, p["layernorm_before"], x)
  q, k, v = linear(a["q_proj"], h), linear(a["k_proj"], h), linear(a["v_proj"], h)
  if cfg.use_qk_norm:  # over the whole width, before the head split
    q, k = rms_norm(a["q_norm"], q, _QK_EPS), rms_norm(a["k_norm"], k, _QK_EPS)
  q, k, v = (t.reshape(b, n, nh, hd) for t in (q, k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd**-0.5)
  probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
  o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, e)
  x = x + p["lambda_1"].astype(x.dtype) * linear(a["projection_layer"], o)
  h = _norm(cfg, p["layernorm_after"], x)
  h = linear(p["mlp"]["fc2"], activation(cfg.hidden_act)(linear(p["mlp"]["fc1"], h)))
  return x + p["lambda_2"].astype(x.dtype) * h


def forward(params: dict, cfg: InternVisionConfig, pixel_values: jax.Array, num_layers: int | None = None):
  """Hidden states [num_layers + 1, B, N+1, E] (index 0 = embeddings) and the last hidden state [B, N+1, E].

  The last hidden state is the final layer's output, through `layernorm` when the config has one
  (use_mean_pooling false), as transformers' `last_hidden_state`. With `num_layers` smaller than the config's,
  later layers are skipped and the last hidden state is not computed (None).
  """
  n = cfg.num_hidden_layers if num_layers is None else num_layers
  x = embed(params, cfg, pixel_values)
  layers = jax.tree.map(lambda w: w[:n], params["encoder"]["layers"])

  def step(h, p):
    h = _layer(cfg, p, h)
    return h, h

  last, hs = jax.lax.scan(step, x, layers)
  hs = jnp.concatenate([x[None], hs], axis=0)
  if n < cfg.num_hidden_layers:
    return hs, None
  if "layernorm" in params:
    last = layer_norm(params["layernorm"], last, cfg.layer_norm_eps)
  return hs, last
