"""OWL-ViT / OWLv2 open-vocabulary detection (transformers `OwlViTForObjectDetection`, `Owlv2ForObjectDetection`).

The image side is the project's CLIP tower (models.clip) with OWL's heads on every patch token; the text side is
CLIP's causal text transformer pooled at the end-of-text token (the largest id of each query).

Params (transformers names below the `owlvit` / `owlv2` prefix, layers stacked on a leading axis):
  vision_model: models.clip params (`pre_layernorm` as OWL spells it), post_layernorm
  text_model: embeddings.{token_embedding, position_embedding}.weight, encoder.layers.*, final_layer_norm
  text_projection.weight, (visual_projection.weight, logit_scale: unused for detection)
  class_head.{dense0, logit_shift, logit_scale}, box_head.{dense0, dense1, dense2},
  objectness_head.{dense0, dense1, dense2} (OWLv2 only), layer_norm
Legend: B images, Q text queries per image, L query tokens, P = (image_size / patch_size)^2 patches, E width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models import clip
from models.config import VisionConfig
from models.layers import activation, layer_norm, linear


@dataclasses.dataclass(frozen=True)
class OwlTextConfig:
  """CLIP text transformer of OWL (transformers `OwlViTTextConfig` / `Owlv2TextConfig`)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 16
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class OwlConfig:
  """An OWL detector: `version` 1 (OWL-ViT) or 2 (OWLv2, with the objectness head)."""

  text: OwlTextConfig = OwlTextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512
  version: int = 2

  @property
  def prefix(self) -> str:
    return "owlv2" if self.version == 2 else "owlvit"

  @property
  def grid(self) -> int:
    return self.vision.image_size // self.vision.patch_size


def parse_config(d: dict) -> OwlConfig:
  """OwlConfig from a config.json dict (model_type "owlvit" or "owlv2"); errors name the field."""
  kind = d.get("model_type")
  if kind not in ("owlvit", "owlv2"):
    raise ValueError(f"config.json model_type {kind!r} is not an OWL detector (expected 'owlvit' or 'owlv2')")
  t, v = d.get("text_config") or {}, d.get("vision_config") or {}
  text = OwlTextConfig(**{f.name: t[f.name] for f in dataclasses.fields(OwlTextConfig) if f.name in t})
  vision = VisionConfig(**{f.name: v[f.name] for f in dataclasses.fields(VisionConfig) if f.name in v})
  for name, cfg in (("text_config", text), ("vision_config", vision)):
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f"config.json {name}.hidden_size {cfg.hidden_size} is not divisible by "
                       f"num_attention_heads {cfg.num_attention_heads}")
  return OwlConfig(text=text, vision=vision, projection_dim=int(d.get("projection_dim", 512)),
                   version=2 if kind == "owlv2" else 1)


def text_embeds(params: dict, cfg: OwlTextConfig, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Pooled, un-normalised text features [N, E_text] of queries input_ids [N, L] (before text_projection)."""
  p = params["text_model"]
  n, length = input_ids.shape
  x = jnp.take(p["embeddings"]["token_embedding"]["weight"], input_ids, axis=0)
  x = x + p["embeddings"]["position_embedding"]["weight"][:length][None]
  causal = jnp.tril(jnp.ones((length, length), bool))
  visible = causal[None] & attention_mask.astype(bool)[:, None, :]  # [N, L, L]
  mask = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [N, 1, L, L] additive, as transformers
  layers = p["encoder"]["layers"]

  def step(h, lp):
    return clip.encoder_layer(cfg, lp, h, mask), None

  x, _ = jax.lax.scan(step, x, layers)
  x = layer_norm(p["final_layer_norm"], x, cfg.layer_norm_eps)
  # transformers pools at argmax(input_ids): the end-of-text token has the largest id of the vocabulary.
  return x[jnp.arange(n), jnp.argmax(input_ids, axis=-1)]


def image_features(params: dict, cfg: OwlConfig, pixel_values: jax.Array) -> jax.Array:
  """Per-patch features [B, P, E] (post_layernorm, times the class token, layer_norm), row-major patches."""
  vm = params["vision_model"]
  hs = clip.forward(vm, cfg.vision, pixel_values)[-1]
  hs = layer_norm(vm["post_layernorm"], hs, cfg.vision.layer_norm_eps)
  feats = hs[:, 1:] * hs[:, :1]
  return layer_norm(params["layer_norm"], feats, cfg.vision.layer_norm_eps)


def _mlp3(p: dict, x: jax.Array) -> jax.Array:
  gelu = activation("gelu")
  return linear(p["dense2"], gelu(linear(p["dense1"], gelu(linear(p["dense0"], x)))))


def box_bias(grid: int) -> jax.Array:
  """[P, 4] logit-space prior: box centre at its patch's corner, size one patch (transformers' compute_box_bias)."""
  coords = jnp.arange(1, grid + 1, dtype=jnp.float32) / grid
  xx, yy = jnp.meshgrid(coords, coords, indexing="xy")
  xy = jnp.clip(jnp.stack([xx, yy], -1).reshape(-1, 2), 0.0, 1.0)
  xy_bias = jnp.log(xy + 1e-4) - jnp.log1p(-xy + 1e-4)
  size = jnp.full_like(xy_bias, 1.0 / grid)
  size_bias = jnp.log(size + 1e-4) - jnp.log1p(-size + 1e-4)
  return jnp.concatenate([xy_bias, size_bias], -1)


def detect(params: dict, cfg: OwlConfig, pixel_values: jax.Array, input_ids: jax.Array,
           attention_mask: jax.Array) -> dict:
  """Text-conditioned detection.

  Args:
    pixel_values: [B, 3, S, S] as the OWL processor makes them.
    input_ids, attention_mask: [B * Q, L] queries, Q per image (a query whose first id is 0 is padding).

  Returns:
    {"logits" [B, P, Q], "pred_boxes" [B, P, 4] (cx, cy, w, h in [0, 1] of the padded square image),
     "objectness_logits" [B, P] (OWLv2; zeros for OWL-ViT), "class_embeds" [B, P, E_text] (unit norm)}.
  """
  b = pixel_values.shape[0]
  feats = image_features(params, cfg, pixel_values)  # [B, P, E]
  queries = linear(params["text_projection"], text_embeds(params, cfg.text, input_ids, attention_mask))
  q = input_ids.shape[0] // b
  queries = queries.reshape(b, q, -1)
  query_mask = input_ids.reshape(b, q, -1)[..., 0] > 0  # [B, Q]
  head = params["class_head"]
  cls = linear(head["dense0"], feats)
  cls_n = cls / (jnp.linalg.norm(cls, axis=-1, keepdims=True) + 1e-6)
  q_n = queries / (jnp.linalg.norm(queries, axis=-1, keepdims=True) + 1e-6)
  logits = jnp.einsum("bpd,bqd->bpq", cls_n, q_n)
  shift = linear(head["logit_shift"], feats)
  scale = jax.nn.elu(linear(head["logit_scale"], feats)) + 1.0
  logits = (logits + shift) * scale
  logits = jnp.where(query_mask[:, None, :], logits, jnp.finfo(logits.dtype).min).astype(jnp.float32)
  boxes = jax.nn.sigmoid(_mlp3(params["box_head"], feats) + box_bias(cfg.grid))
  objectness = (_mlp3(params["objectness_head"], feats)[..., 0] if "objectness_head" in params
                else jnp.zeros(feats.shape[:2], feats.dtype))
  return {"logits": logits, "pred_boxes": boxes, "objectness_logits": objectness, "class_embeds": cls_n}


def center_to_corners(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
