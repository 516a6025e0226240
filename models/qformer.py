"""InstructBLIP Q-Former (transformers `InstructBlipQFormerModel`): a post-LN BERT whose first Q rows are learned
query tokens that cross-attend to the image, followed by the instruction tokens (InstructBLIP's addition).

Per layer: self-attention over [queries ; instruction] (instruction padding masked as keys), then for the query
rows only a cross-attention to the image embeddings (layers with index % cross_attention_frequency == 0) and the
query feed-forward (`intermediate_query` / `output_query`); instruction rows use `intermediate` / `output`.
Embeddings: instruction word + absolute position embeddings (positions 0..Tq-1), queries without positions,
then LayerNorm over the concatenation.
Params (transformers names): embeddings.{word_embeddings, position_embeddings, layernorm};
encoder.layer: a tuple of per-layer trees (cross-attention layers differ) with attention.{attention.{query, key,
value}, output.{dense, LayerNorm}}, crossattention (same), intermediate.dense, output.{dense, LayerNorm},
intermediate_query.dense, output_query.{dense, LayerNorm}.
Legend: B batch, Q query tokens, Tq instruction tokens, N image tokens, E width, H heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.layers import activation, layer_norm, linear

NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  vocab_size: int = 30523
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408

  def has_cross(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0


def _mha(cfg: QFormerConfig, p: dict, x: jax.Array, kv: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  b, t, e = x.shape
  h = cfg.num_attention_heads
  d = e // h
  q = linear(p["attention"]["query"], x).reshape(b, t, h, d)
  k = linear(p["attention"]["key"], kv).reshape(b, kv.shape[1], h, d)
  v = linear(p["attention"]["value"], kv).reshape(b, kv.shape[1], h, d)
  s = (jnp.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5).astype(jnp.float32)
  if key_mask is not None:
    s = jnp.where(key_mask[:, None, None, :], s, NEG)
  a = jax.nn.softmax(s, axis=-1).astype(x.dtype)
  o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, e)
  return layer_norm(p["output"]["LayerNorm"], linear(p["output"]["dense"], o) + x, cfg.layer_norm_eps)


def _ffn(cfg: QFormerConfig, inter: dict, out: dict, x: jax.Array) -> jax.Array:
  y = activation(cfg.hidden_act)(linear(inter["dense"], x))
  return layer_norm(out["LayerNorm"], linear(out["dense"], y) + x, cfg.layer_norm_eps)


def forward(params: dict, cfg: QFormerConfig, query_tokens: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
            image_embeds: jax.Array) -> jax.Array:
  """query_tokens [Q, E] or [1, Q, E], instruction input_ids / attention_mask [B, Tq], image_embeds [B, N, Ev]
  -> the query rows of the last hidden state [B, Q, E]."""
  emb = params["embeddings"]
  b, tq = input_ids.shape
  words = jnp.take(emb["word_embeddings"]["weight"], input_ids, axis=0)
  words = words + emb["position_embeddings"]["weight"][:tq][None].astype(words.dtype)
  queries = query_tokens.reshape(-1, query_tokens.shape[-1]).astype(words.dtype)
  nq = queries.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(queries[None], (b,) + queries.shape), words], axis=1)
  x = layer_norm(emb["layernorm"], x, cfg.layer_norm_eps)
  key_mask = jnp.concatenate([jnp.ones((b, nq), bool), attention_mask.astype(bool)], axis=1)
  image_embeds = image_embeds.astype(x.dtype)
  for li, p in enumerate(params["encoder"]["layer"]):
    x = _mha(cfg, p["attention"], x, x, key_mask)
    qx = x[:, :nq]
    if cfg.has_cross(li):
      qx = _mha(cfg, p["crossattention"], qx, image_embeds, None)
    qx = _ffn(cfg, p["intermediate_query"], p["output_query"], qx)
    tx = _ffn(cfg, p["intermediate"], p["output"], x[:, nq:])
    x = jnp.concatenate([qx, tx], axis=1)
  return x[:, :nq]


def param_shapes(cfg: QFormerConfig) -> dict:
  e, i = cfg.hidden_size, cfg.intermediate_size

  def lin(o, n):
    return {"weight": (o, n), "bias": (o,)}

  def ln():
    return {"weight": (e,), "bias": (e,)}

  def attn(kv_width):
    return {"attention": {"query": lin(e, e), "key": lin(e, kv_width), "value": lin(e, kv_width)},
            "output": {"dense": lin(e, e), "LayerNorm": ln()}}

  layers = []
  for li in range(cfg.num_hidden_layers):
    layer = {"attention": attn(e), "intermediate": {"dense": lin(i, e)},
             "output": {"dense": lin(e, i), "LayerNorm": ln()}, "intermediate_query": {"dense": lin(i, e)},
             "output_query": {"dense": lin(e, i), "LayerNorm": ln()}}
    if cfg.has_cross(li):
      layer["crossattention"] = attn(cfg.encoder_hidden_size)
    layers.append(layer)
  return {"embeddings": {"word_embeddings": {"weight": (cfg.vocab_size, e)},
                         "position_embeddings": {"weight": (cfg.max_position_embeddings, e)}, "layernorm": ln()},
          "encoder": {"layer": tuple(layers)}}
