"""The one place the analyses touch a model's internals: decoder attention, layer inputs, value norms, W_QK.

Everything else in `air_jax.analysis` works on the arrays these functions return. All of them serve any
registered family through the family interface: decoder attention from `models.family.forward`, layer inputs from
the decoder's residual stream (`output_hidden_layers`), value norms from `Family.value_norms`, W_QK from
`Family.qk_factors` (which refuses, by name, decoders whose scores are not bilinear in the layer input: q/k norms
or biases as in Qwen3 / Qwen2, MLA).

Shape legend: L decoder layers, B batch, H query heads, K key/value heads, D head dim, E hidden width,
T sequence length, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import family as family_lib


def text_config(model):
  """The decoder config (sizes: num_hidden_layers, num_attention_heads, head_dim, hidden_size)."""
  return text_config_of(model.config)


def text_config_of(config):
  return getattr(config, "text", config)


def lm_params(model) -> dict:
  """The decoder params (embed_tokens, layers stacked over L or a tuple of per-layer trees, norm)."""
  params = getattr(model, "params", model)
  return params["language_model"]


@functools.partial(jax.jit, static_argnames=("config",))
def _attentions(params, config, ids, mask, pixels):
  return family_lib.forward(params, config, ids, pixels, attention_mask=mask, output_attentions=True)["attentions"]


def decoder_attentions(model, input_ids, attention_mask=None, pixel_values=None) -> np.ndarray:
  """Post-softmax decoder attention of a full (teacher-forced) forward pass.

  Args:
    model: a LoadedModel (or anything with `.params` and `.config` in its layout).
    input_ids: [B, T] int; image placeholders expanded as the processor does, or one placeholder and no pixels.
    attention_mask: [B, T] (default all ones).
    pixel_values: [I, C, H, W] or None (text only: image placeholders keep their token embedding).

  Returns:
    [L, B, H, T, T] float32 numpy.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  pixels = None if pixel_values is None else jax.tree.map(jnp.asarray, pixel_values)
  params = getattr(model, "params", model)
  return np.asarray(_attentions(params, model.config, ids, mask, pixels), np.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_io(params, config, ids, mask, pixels):
  fam = family_lib.family_of(config)
  embeds, positions, ctx = family_lib.prompt_pieces(params, config, ids, mask, pixels)
  nl = family_lib.dims(config).num_hidden_layers
  _, _, extras = fam.decoder(params, config, embeds, positions, ctx, output_hidden_layers=tuple(range(nl)))
  states = extras["hidden_states"]  # [L, B, T, E]: the residual stream entering each layer
  x = states.astype(jnp.float32)
  eps = getattr(text_config_of(config), "rms_norm_eps", 1e-6)
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return normed, fam.value_norms(params, config, states)


def layer_inputs(model, input_ids, attention_mask=None, pixel_values=None) -> tuple[np.ndarray, np.ndarray]:
  """Per layer: the RMS-normalised input states (before the norm's gain) and the per-head value norms.

  Any family: the states are the decoder's residual stream (`output_hidden_layers`), the value norms come from
  `Family.value_norms`.

  Returns:
    states [L, B, T, E] (what each layer's attention reads, up to its gain) and value_norms [L, B, H, T]
    (||W_O^h v_j^h||, the size of key j's contribution through head h per unit of attention).
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  pixels = None if pixel_values is None else jax.tree.map(jnp.asarray, pixel_values)
  params = getattr(model, "params", model)
  try:
    states, norms = _layer_io(params, model.config, ids, mask, pixels)
  except NotImplementedError as e:
    raise ValueError(f"layer inputs and value norms: {e}") from e
  return np.asarray(states, np.float32), np.asarray(norms, np.float32)


def qk_factors(model, layer: int, fold_norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) [H, D, E] float64 of one decoder layer with W_QK^h = a[h]^T b[h] (RoPE ignored; see `qk_matrices`).

  Key heads are repeated for the query heads that share them (GQA). Never forms an E x E matrix. Families whose
  scores are not bilinear in the layer input (q/k norms or biases, MLA) raise a ValueError naming why.
  """
  params = getattr(model, "params", model)
  try:
    return family_lib.family_of(model.config).qk_factors(params, model.config, layer, fold_norm)
  except NotImplementedError as e:
    raise ValueError(str(e)) from e


def qk_matrices(model, fold_norm: bool = True) -> np.ndarray:
  """Per-head query-key matrices W_QK = W_Q^h^T W_K^h of the decoder, [L, H, E, E] float64 (RoPE ignored).

  The logit of query state x_i and key state x_j in head h is x_i^T W_QK x_j / sqrt(D) (before RoPE). With
  fold_norm, W_QK acts on RMS-normalised states: the input norm's gain g is folded in (diag(g) W_QK diag(g)).
  L x H x E x E: small models only (a 7B model would need 137 GB); use `qk_factors` for large ones.
  """
  nl = family_lib.dims(model.config).num_hidden_layers
  return np.stack([np.einsum("hde,hdf->hef", *qk_factors(model, layer, fold_norm)) for layer in range(nl)])


__all__ = ["decoder_attentions", "layer_inputs", "lm_params", "qk_factors", "qk_matrices", "text_config"]
