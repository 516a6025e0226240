"""The model-family interface: what generation, AIR, attribution, analyses and evaluation need from an LVLM.

Shared code never asks which family it runs. It looks the family up from the (static, frozen) config object
(`family_of(config)`), or from a checkpoint's `config.json` (`family_for_config_dict`), and calls the methods
below. A family is one module that subclasses `Family`, sets its class attributes and calls `register(...)` at
import time; add the module's import path to `FAMILY_MODULES` so the registry finds it.

Contract (B batch, T prompt tokens, S key slots, E decoder width, V vocab, L decoder layers, H query heads):

Config and checkpoint
  - `model_types` / `architectures`: the `config.json` `model_type` values and `architectures` entries this family
    loads (model_type is matched first, then architectures).
  - `parse_config(raw: dict) -> config`: a frozen, hashable dataclass (it is a static jit argument) that raises a
    ValueError naming the field on unsupported values. Every config must expose `config.dims`, a `DecoderDims`
    (layers / heads / kv heads / head_dim / width / vocab / EOS ids of the language decoder), which is all that
    AIR presets, specs, attribution and analyses use to size their arrays. Register the config class in
    `config_types` so `family_of(config)` finds the family.
  - `complete_config(config, raw, path) -> config`: fills in what config.json leaves to the checkpoint's other
    files (default: unchanged); `air_jax.load_config` calls it with the checkpoint directory.
  - `param_shapes(config) -> tree`: nested dicts of shape tuples (leaves), transformers names, decoder layers
    stacked on a leading L axis. This is the tree `convert.checkpoint.load_params` fills and `jax.eval_shape`
    counts.
  - `key_prefixes`: ((checkpoint prefix, canonical prefix), ...), longest first, covering every known
    transformers key layout (legacy hub, 4.5x `model.*`, 5.x). `stack_renames`: ((canonical prefix, stacked
    prefix), ...) for towers whose per-layer keys are named otherwise than their stacked param (e.g. Qwen's
    `visual.blocks.{i}` -> `visual.layers`). `ignored_keys`: regexes of non-parameter buffers.
    `skip_key(name, config)`: canonical names present in some checkpoints but not parameters of this config
    (e.g. a tied `lm_head.weight`). The loader checks that every other key is used and every param filled with
    the right shape. `head_key_role(key)`, `untie(config)`: which checkpoint keys hold the LM head / the input
    embeddings, and the config with an untied head (a tied config whose checkpoint stores a different head is
    untied on load, as transformers does).
  - `decoder_path`: the top-level params key of the language decoder (its `layers` may be unstacked into per-layer
    buffers on CPU, see `per_layer_params`).

Processor and inputs
  - `load_processor(path)`: the checkpoint's processor (default: transformers' AutoProcessor).
  - `prepare_inputs(processor, config, images, prompts, bucket) -> dict of numpy arrays`: one user turn per
    (image, prompt) through the checkpoint's chat template, tokenised LEFT padded; the length padded up to a
    multiple of `bucket` (left, with pad id and mask 0). Keys: "input_ids" [B, T] int32, "attention_mask"
    [B, T] int32, "vision": the family's image inputs, either one array or a dict of arrays. EVERY array in
    "vision" must have the batch as its leading axis (generation pads the batch by repeating row 0 and shards
    axis 0 over the data axis), and must not depend on T (attribution appends caption tokens to the ids).
    Ragged per-example data (tiles, patches, grid sizes) is padded per example, with index arrays that say
    which rows are real.

Model functions (pure, jit/vmap-able; `params` is the whole param tree, `vision` as prepare_inputs makes it)
  - `embed(params, config, input_ids, attention_mask, vision) -> embeds [B, T, E]`: token embeddings with the
    image features (vision tower + projector + merge) placed at the image-token positions. `vision` may be None
    (text only).
  - `positions(config, input_ids, attention_mask, vision) -> positions`: [B, T] int32 for 1-D RoPE, or any
    array whose LAST two axes are [B, T] (multimodal RoPE: [3, B, T]). The decoder receives exactly this.
  - `next_position(config, positions, attention_mask) -> [B] int32`: the position offset of the first decoded
    token (default: max over real tokens + 1). Decoding carries it in `DecodeState.next_position` and adds 1 per
    step; `decode_positions(config, next_position [B])` turns it into the positions of a one-token chunk
    ([B, 1] by default; multimodal RoPE broadcasts to [3, B, 1], where text tokens advance all three axes
    together, so Qwen2-VL's rope_deltas are already inside next_position). Head attribution re-scores an
    earlier text slot j with next_position - (T - j), so text after the last image must advance the position
    offset by exactly one per slot.
  - `segments(config, input_ids, attention_mask) -> [B, T] int32` key segments (models.segments ids): SYSTEM
    before the first image token, IMAGE at every image-feature position (all runs: tiles, newline rows, several
    images), TEXT for the rest, PAD for padding. Default: `models.segments.segment_ids` with the config's
    `image_token_id`. `wraps_images`: True when each image run is framed by a start and an end token that
    views without the image drop with it (Qwen2.5-VL, InternVL).
  - `embed_tokens(params, config, ids [B, t]) -> [B, t, E]` (decoding steps feed tokens only).
  - `decoder(params, config, embeds, positions, ctx, *, spec=None, cache=None, write_index=0,
    output_attentions=False, output_stats=False, cache_write=True[, output_hidden_layers=()]) -> (hidden [B, T, E],
    cache, extras)`, as
    `models.llama.decoder`: attention through `models.attention.attend` (sites scores / pattern / z, spec
    sliced per layer with `models.spec.layer_slice`), `ctx` a `models.spec.AttnContext` (mask [B, T, S] is
    causal + padding; a decoder may narrow it, e.g. a sliding window, before handing it to `attend`, so the
    interventions see the same visible keys), the chunk written at slot `write_index` of the cache; with
    `cache_write=False` (one row) the cache is read only and the row's own key stands in at `write_index`
    (`attend(own=...)`). extras: "attentions" [L, B, H, T, S] and/or "segment_mass" [L, B, H, 3].
  - `init_cache(params, config, batch, size, dtype) -> cache`: an opaque pytree; decoding only threads it
    through `decoder`. Searches that move whole rows (beam search, OPERA's roll-back log) look at it only through
    `cache_view(config, cache) -> (view, batch_axes, slot_axes)` and `cache_from_view(config, view)`: the
    leaves reshaped (no copy) so the batch has an axis of its own (e.g. the Llama per-layer cache [B*K, D, S]
    is viewed as [B, K, D, S]). A family with another cache (e.g. DeepSeek-V2's MLA latent cache
    {"latent": [L, B, S, r], "k_rope": [L, B, S, d_r]}) returns that here and reads/writes it in its own
    decoder; the only rule is that slot s of every cache array holds the token at column s of
    [prompt | generated], so `write_index` and the key segments index it. Choose the layout (stacked vs
    per-layer) from `params` (see `per_layer_params`).
  - `logits(params, config, hidden [..., E]) -> [..., V]` float32; `exit_logits(params, config, hidden [K, B, E],
    final_norm)` the early-exit readout of the residual streams `output_hidden_layers` asked the decoder for
    (extras "hidden_states" [K, B, T, E]); optional, for early-exit methods (DoLa).
  - `per_layer_params(params)`: params with the decoder layers as a tuple of per-layer trees (XLA:CPU decodes
    faster); the decoder must accept both layouts.
  - `partition_rules(config)` (sharded inference, see `air_jax.sharding`): ((regex over the dotted param path,
    axis names of the per-layer tensor, e.g. ("model", None) for a column-parallel [out, in] weight), ...), the
    first match wins, unmatched params are replicated; stacked layer axes are added by `air_jax.sharding`.
    Heads must be split on the model axis through q/k/v rows and o_proj columns so the sites see whole heads.
  - `map_pixels(config, vision, fn)`: the vision input with `fn` applied to its pixel arrays (e.g. a decoding method's
    noised-image view); the default handles a bare array and a dict's "pixel_values". `vision=None` (a
    text-only view) must be accepted by `embed`.
  - `max_image_tokens(config)`, `max_vision_tiles(config)`: the largest image's feature count and the images
    (tiles) one example sends through the vision tower; `air_jax.plan` sizes its memory plan with them.
  - Optional, for the analyses and faster attribution: `value_norms(params, config, states)` (per-head
    ||W_O^h v_j^h||), `qk_factors(params, config, layer)` (W_QK of bilinear scores), `supports_layer_reuse(config)`
    (the decoder is models.llama_parts' stack, so attribution may reuse the clean run layer by layer).

Helpers here build the prompt context and a full forward from these pieces, for every family alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

import jax
import jax.numpy as jnp

from models import segments as seg_lib
from models.spec import AttnContext

# Modules that define (and register) the built-in families; imported on the first registry lookup.
FAMILY_MODULES = ("models.llava", "models.llava_next", "models.qwen2_5_vl", "models.internvl", "models.instructblip",
                  "models.deepseek_vl2")


@dataclasses.dataclass(frozen=True)
class DecoderDims:
  """What family-agnostic code needs to know about the language decoder (transformers names)."""

  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  hidden_size: int
  vocab_size: int
  eos_token_id: tuple[int, ...] = ()
  max_position_embeddings: int | None = None  # None: no limit is known (generation then checks memory only)


class Family:
  """Base class of a model family; see the module docstring for the contract. Defaults suit LLaVA-style models."""

  name: str = ""
  max_images_per_prompt: int | None = 1  # None: any number (a list of images per prompt)
  # True when every run of image tokens is framed by one start and one end token that exist only because of the
  # image (Qwen2.5-VL's <|vision_start|> / <|vision_end|>, InternVL's <img> / </img>): views of the prompt without
  # the image (PAI's text-only view) drop them with it.
  wraps_images: bool = False
  model_types: tuple[str, ...] = ()
  architectures: tuple[str, ...] = ()
  config_types: tuple[type, ...] = ()
  key_prefixes: tuple[tuple[str, str], ...] = ()
  stack_renames: tuple[tuple[str, str], ...] = ()
  ignored_keys: tuple[re.Pattern, ...] = (re.compile(r"\.rotary_emb\.inv_freq$"),
                                          re.compile(r"embeddings\.position_ids$"))
  decoder_path: str = "language_model"

  # ---- config and checkpoint ----
  def parse_config(self, raw: dict):
    raise NotImplementedError

  def complete_config(self, config, raw: dict, path: str):
    """The parsed config with what config.json leaves to the checkpoint's other files in directory `path`
    (e.g. a token id the official processor reads from the tokenizer). Default: unchanged."""
    return config

  def param_shapes(self, config) -> dict:
    raise NotImplementedError

  def skip_key(self, name: str, config) -> bool:
    """Canonical names to drop silently (default: a stored lm_head when embeddings are tied)."""
    return name == "lm_head.weight" and _tied(config)

  def head_key_role(self, key: str) -> str | None:
    """"head" / "embed" for the checkpoint keys of the LM head and the LM's input embeddings, else None (default:
    through `canonical_key`). Used by `convert.checkpoint.resolve_tied_head`."""
    return {"lm_head.weight": "head", "language_model.embed_tokens.weight": "embed"}.get(self.canonical_key(key))

  def untie(self, config):
    """The config with an untied LM head (a stored head that differs from the embeddings is used as stored)."""
    import dataclasses

    return dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=False))

  def load_params(self, path: str, config, dtype, sharding=None) -> dict:
    """The validated param tree of checkpoint `path` (default: the generic prefix-table loader,
    convert.checkpoint). Families whose keys need more than a rename (fused tensors, per-layer trees) override."""
    from convert.checkpoint import load_params

    return load_params(path, config, dtype, family=self, sharding=sharding)

  def canonical_key(self, key: str) -> str | None:
    for old, new in self.key_prefixes:
      if key.startswith(old):
        name = new + key[len(old):]
        for per_layer, stacked in self.stack_renames:
          if name.startswith(per_layer):
            return stacked + name[len(per_layer):]
        return name
    return None

  # ---- processor and inputs ----
  def load_processor(self, path: str):
    from transformers import AutoProcessor  # deferred: transformers import is slow

    require_tokenizer_files(path)
    try:
      return AutoProcessor.from_pretrained(path)
    except Exception as e:  # transformers raises many types here; name the directory
      raise ValueError(f"could not load the processor (tokenizer/image processor) from {path}: {e}") from e

  def prepare_inputs(self, processor, config, images, prompts, bucket: int) -> dict:
    raise NotImplementedError

  # ---- model functions ----
  def embed(self, params, config, input_ids, attention_mask, vision):
    raise NotImplementedError

  def positions(self, config, input_ids, attention_mask, vision):
    pos = jnp.cumsum(attention_mask, axis=-1) - 1  # transformers' generate convention, padding at 1
    return jnp.where(attention_mask.astype(bool), pos, 1).astype(jnp.int32)

  def next_position(self, config, positions, attention_mask):
    valid = attention_mask.astype(bool)
    pos = positions.reshape((-1,) + valid.shape).max(axis=0) if positions.ndim > 2 else positions
    return (jnp.max(jnp.where(valid, pos, -1), axis=-1) + 1).astype(jnp.int32)

  def decode_positions(self, config, next_position):
    return next_position[:, None]

  def segments(self, config, input_ids, attention_mask):
    return seg_lib.segment_ids(input_ids, attention_mask, config.image_token_id)

  def embed_tokens(self, params, config, ids):
    raise NotImplementedError

  def decoder(self, params, config, embeds, positions, ctx, *, spec=None, cache=None, write_index=0,
              output_attentions=False, output_stats=False, cache_write=True):
    raise NotImplementedError

  def init_cache(self, params, config, batch: int, size: int, dtype):
    raise NotImplementedError

  def logits(self, params, config, hidden):
    raise NotImplementedError

  def exit_logits(self, params, config, hidden, final_norm: bool):
    """Early-exit readout (DoLa): residual streams hidden [K, B, E] -> logits [K, B, V] float32, through the final
    norm when `final_norm`. Families whose decoder supports `output_hidden_layers` implement it."""
    raise NotImplementedError(f"the {self.name} family has no early-exit readout (needed by early-exit methods "
                              "such as DoLa)")

  def value_norms(self, params, config, states):
    """||W_O^h v_j^h|| [L, B, H, T] float32 from states [L, B, T, E], the residual stream entering each decoder
    layer (`decoder(..., output_hidden_layers=range(L))`): the size of what key j writes into the residual stream
    through head h per unit of attention (the analyses' value-weighted terms)."""
    raise NotImplementedError(f"the {self.name} family does not give per-head value norms")

  def qk_factors(self, params, config, layer: int, fold_norm: bool = True):
    """(a, b) [H, D, E] float64 numpy with W_QK^h = a[h]^T b[h] for one decoder layer (RoPE ignored): the
    analyses' query-key matrices. Families whose attention score is bilinear in the layer input implement it."""
    raise NotImplementedError(f"the {self.name} family's attention scores have no W_QK factors")

  def per_layer_params(self, params):
    return params

  def cache_view(self, config, cache):
    """(view, batch_axes, slot_axes): the cache with every leaf reshaped (no copy) to have a batch axis of its own,
    and per leaf the index of that axis and of the slot axis. Default: the cache is its own view, stacked
    (a dict: [L, B, S, ...]) or per layer (a sequence: [B, S, ...])."""
    stacked = isinstance(cache, dict)
    return (cache, jax.tree.map(lambda _: 1 if stacked else 0, cache),
            jax.tree.map(lambda _: 2 if stacked else 1, cache))

  def cache_from_view(self, config, view):
    """Inverse of `cache_view`; the batch axis may have changed size (beams, split examples)."""
    return view

  def supports_layer_reuse(self, config) -> bool:
    """True when the decoder is the pre-norm Llama stack of models.llama_parts (params under `language_model`,
    `config.text` a TextConfig; no sliding window), so head attribution may reuse the clean run layer by layer
    (air_jax.attribution_reuse). Other families get the plain (whole-model) ablation path."""
    return False

  def partition_rules(self, config) -> tuple:
    return ()

  def map_pixels(self, config, vision, fn):
    if vision is None:
      return None
    if isinstance(vision, dict):
      return dict(vision, pixel_values=fn(vision["pixel_values"]))
    return fn(vision)

  def max_image_tokens(self, config) -> int:
    return int(getattr(config, "num_image_tokens", 0))

  def max_vision_tiles(self, config) -> int:
    return 1 if hasattr(config, "vision") else 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def require_tokenizer_files(path: str) -> None:
  """Raises a ValueError naming the files expected when a checkpoint directory holds no tokenizer at all.

  (Without this check transformers falls through its loaders and ends with advice to install sentencepiece.)
  """
  import os

  if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise ValueError(f"{path} holds no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} (with "
                     "tokenizer_config.json) beside config.json; copy the tokenizer files of the checkpoint there")


def _tied(config) -> bool:
  text = getattr(config, "text", None)
  return bool(getattr(text, "tie_word_embeddings", False))


_BY_MODEL_TYPE: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}
_BY_CONFIG: dict[type, Family] = {}
_LOADED = False


def register(family: Family) -> Family:
  """Adds a family to the registry (called by the family's module at import time)."""
  for mt in family.model_types:
    _BY_MODEL_TYPE[mt] = family
  for arch in family.architectures:
    _BY_ARCH[arch] = family
  for ct in family.config_types:
    _BY_CONFIG[ct] = family
  return family


def _load_builtin() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    for mod in FAMILY_MODULES:
      importlib.import_module(mod)


def family_of(config) -> Family:
  """The family of a parsed config object."""
  _load_builtin()
  fam = _BY_CONFIG.get(type(config))
  if fam is None:
    raise TypeError(f"no model family is registered for config type {type(config).__name__}")
  return fam


def family_for_config_dict(raw: dict, source: str = "config.json") -> Family:
  """The family of a checkpoint's config.json dict: by `model_type`, then by `architectures`."""
  _load_builtin()
  mt = raw.get("model_type")
  if mt in _BY_MODEL_TYPE:
    return _BY_MODEL_TYPE[mt]
  for arch in raw.get("architectures") or ():
    if arch in _BY_ARCH:
      return _BY_ARCH[arch]
  raise ValueError(f"{source}: model_type {mt!r} / architectures {raw.get('architectures')!r} belong to no "
                   f"supported family; supported model_type values: {sorted(_BY_MODEL_TYPE)}")


def families() -> list[Family]:
  _load_builtin()
  return sorted({id(f): f for f in _BY_MODEL_TYPE.values()}.values(), key=lambda f: f.name)


def dims(config) -> DecoderDims:
  """The decoder dims of any family's config."""
  return config.dims


# ---------------------------------------------------------------------------------------------------------------
# Family-agnostic helpers built from the interface.
# ---------------------------------------------------------------------------------------------------------------


def context_from_segments(seg: jax.Array, key_slots: int | None = None) -> AttnContext:
  """AttnContext of a prompt chunk with segment ids seg [B, T] at slots [0, T) of S = key_slots (default T)."""
  b, t = seg.shape
  s = t if key_slots is None else key_slots
  key_seg = jnp.full((b, s), seg_lib.PAD, jnp.int32).at[:, :t].set(seg)
  valid = key_seg != seg_lib.PAD
  causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
  mask = causal[None] & valid[:, None, :]
  return AttnContext(key_segments=key_seg, query_segments=seg, mask=mask, query_slot=jnp.arange(t), prefill=True)


def prompt_pieces(params, config, input_ids, attention_mask, vision, key_slots: int | None = None):
  """(embeds [B, T, E], positions, ctx) of a prompt, for any family."""
  fam = family_of(config)
  embeds = fam.embed(params, config, input_ids, attention_mask, vision)
  positions = fam.positions(config, input_ids, attention_mask, vision)
  ctx = context_from_segments(fam.segments(config, input_ids, attention_mask), key_slots)
  return embeds, positions, ctx


def forward(params, config, input_ids, vision, *, attention_mask=None, spec=None, output_attentions: bool = False,
            position_ids=None) -> dict[str, Any]:
  """Full (uncached) forward pass of any family: {"logits": [B, T, V] float32} (+ "attentions" [L, B, H, T, T])."""
  fam = family_of(config)
  params = getattr(params, "params", params)
  input_ids = jnp.asarray(input_ids)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  embeds, positions, ctx = prompt_pieces(params, config, input_ids, attention_mask, vision)
  if position_ids is not None:
    positions = jnp.asarray(position_ids)
  hidden, _, extras = fam.decoder(params, config, embeds, positions, ctx, spec=spec,
                                  output_attentions=output_attentions)
  out = {"logits": fam.logits(params, config, hidden)}
  out.update(extras)
  return out


# The jitted full forward every family's public `forward` may end in (config and output_attentions static).
forward_jit = jax.jit(forward, static_argnames=("config", "output_attentions"))
