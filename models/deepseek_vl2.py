"""DeepSeek-VL2 (official `DeepseekVLV2ForCausalLM`, deepseek-ai/DeepSeek-VL2): SigLIP tiles -> 2x2 downsampling MLP
projector -> tile/newline/view-separator layout -> DeepSeek-V2 (MLA + MoE) decoder.

transformers has no DeepSeek-VL2 class; this follows the official `prepare_inputs_embeds` and `MlpProjector`:
  * every image is one global view (the image padded to S x S) followed by th x tw local tiles (the image padded to
    the best candidate resolution, cut row-major into S x S crops), all through the shared SigLIP tower
    (last layer, post-norm; the attention-pool head is ignored);
  * projector `downsample_mlp_gelu`: the g x g patch grid is zero-padded to even size, every 2x2 block concatenated
    channel-major (torch `F.unfold`: feature c * 4 + 2 * di + dj), then Linear -> GELU -> ... -> Linear;
  * layout (tile_tag "2D", global_view_pos "head"): global h x w features with `image_newline` after each row,
    one `view_seperator`, then the local tiles stitched into a (th h) x (tw w) grid with `image_newline` after each
    row; "tail" puts the local block first. Token count h (w + 1) + 1 + th h (tw w + 1), h = w = ceil(g / 2).
Every one of those positions holds the `<image>` token in input_ids, so the image segment is exactly them.
Params: {"vision": models.siglip tree, "projector": {"layers": {"0": linear, "2": linear, ...}},
         "image_newline": [E], "view_seperator": [E], "language_model": models.deepseek_v2 tree, "lm_head"?}.
Legend: B batch, I images, X tiles (all images), P = h * w features per tile, E text width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from models import deepseek_v2, siglip
from models.config import _check
from models.deepseek_v2_config import DeepseekV2TextConfig, deepseek_v2_config_from_dict
from models.layers import linear
from models.llama import early_exit_logits, embed_tokens, lm_head
from models.llava import merge_image_features, positions_from_mask, prompt_context
from models.siglip import SiglipVisionConfig
from models.spec import RectificationSpec

_PROJECTORS = ("downsample_mlp_gelu", "mlp_gelu", "linear")
# The official tokenizer's '<image>' id; config.json does not carry it (the loader checks it against tokenizer.json).
OFFICIAL_IMAGE_TOKEN_ID = 128815


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  projector_type: str = "downsample_mlp_gelu"
  input_dim: int = 1152
  n_embed: int = 2048
  depth: int = 2
  mlp_ratio: int = 1
  downsample_ratio: int = 2

  def linear_shapes(self) -> list[tuple[int, int]]:
    """(out, in) of each Linear, in torch Sequential order (GELUs sit between them)."""
    if self.projector_type == "linear":
      return [(self.n_embed, self.input_dim)]
    if self.projector_type == "mlp_gelu":
      return [(self.n_embed, self.input_dim)] + [(self.n_embed, self.n_embed)] * (self.depth - 1)
    r, wide = self.downsample_ratio, self.n_embed * self.mlp_ratio
    return ([(wide, self.input_dim * r * r)] + [(wide, wide)] * (self.depth - 2) + [(self.n_embed, wide)])


@dataclasses.dataclass(frozen=True)
class DeepseekVL2Config:
  vision: SiglipVisionConfig = SiglipVisionConfig()
  projector: ProjectorConfig = ProjectorConfig()
  text: DeepseekV2TextConfig = DeepseekV2TextConfig()
  tile_tag: str = "2D"
  global_view_pos: str = "head"
  candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
  image_token_id: int = 128815

  @property
  def tile_grid(self) -> int:
    """h = w: features per tile side after the projector."""
    g = self.vision.grid
    return math.ceil(g / self.projector.downsample_ratio) if self.projector.projector_type == "downsample_mlp_gelu" else g

  def num_image_tokens(self, num_width_tiles: int, num_height_tiles: int) -> int:
    h = self.tile_grid
    return h * (h + 1) + 1 + num_height_tiles * h * (num_width_tiles * h + 1)

  def tiles_of(self, resolution: tuple[int, int]) -> tuple[int, int]:
    """(width tiles, height tiles) of a candidate resolution (width, height)."""
    tile = self.vision.image_size
    return resolution[0] // tile, resolution[1] // tile


def config_from_dict(d: dict) -> DeepseekVL2Config:
  """Parses the official config.json (vision_config / projector_config / language_config)."""
  mt = d.get("model_type", "deepseek_vl_v2")
  _check(mt == "deepseek_vl_v2", "model_type", mt, "'deepseek_vl_v2'")
  for key in ("vision_config", "projector_config", "language_config"):
    if key not in d:
      raise ValueError(f"config is missing the field {key!r}")
  v, p = d["vision_config"], d["projector_config"]
  width = v.get("width", 1152)
  _check(isinstance(width, int), "vision_config.width", width, "an int (SigLIP tower; DeepSeek-OCR's SAM+CLIP is not "
         "supported)")
  vision = SiglipVisionConfig(
      hidden_size=int(width), intermediate_size=int(width * float(v.get("mlp_ratio", 3.7362))),
      num_hidden_layers=int(v.get("layers", 27)), num_attention_heads=int(v.get("heads", 16)),
      image_size=int(v.get("image_size", 384)), patch_size=int(v.get("patch_size", 14)),
      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  ptype = p.get("projector_type", "downsample_mlp_gelu")
  _check(ptype in _PROJECTORS, "projector_config.projector_type", ptype, f"one of {_PROJECTORS}")
  _check(not p.get("token_pooling", False), "projector_config.token_pooling", p.get("token_pooling"), "false")
  proj = ProjectorConfig(projector_type=ptype, input_dim=int(p.get("input_dim", 1152)),
                         n_embed=int(p.get("n_embed", 2048)), depth=int(p.get("depth", 2)),
                         mlp_ratio=int(p.get("mlp_ratio", 1)), downsample_ratio=int(p.get("downsample_ratio", 2)))
  _check(proj.input_dim == vision.hidden_size, "projector_config.input_dim", proj.input_dim,
         f"the vision width {vision.hidden_size}")
  tile_tag = d.get("tile_tag", "2D")
  _check(tile_tag == "2D", "tile_tag", tile_tag, "'2D' (the 1D tile-indicator variant is not implemented)")
  gpos = d.get("global_view_pos", "head")
  _check(gpos in ("head", "tail"), "global_view_pos", gpos, "'head' or 'tail'")
  text = deepseek_v2_config_from_dict(dict(d["language_config"], model_type="deepseek_v2"), official=True)
  _check(proj.n_embed == text.hidden_size, "projector_config.n_embed", proj.n_embed,
         f"the language width {text.hidden_size}")
  cands = tuple(tuple(int(x) for x in c) for c in d.get("candidate_resolutions", [[vision.image_size] * 2]))
  tok = d.get("image_token_id", OFFICIAL_IMAGE_TOKEN_ID)  # the tokenizer's id: FAMILY.complete_config
  return DeepseekVL2Config(vision=vision, projector=proj, text=text, tile_tag=tile_tag, global_view_pos=gpos,
                           candidate_resolutions=cands, image_token_id=int(tok))


def project(params: dict, cfg: DeepseekVL2Config, feats: jax.Array) -> jax.Array:
  """SigLIP features [X, g*g, C] -> projected tile features [X, h*w, E] (official MlpProjector)."""
  pc = cfg.projector
  x = feats
  if pc.projector_type == "downsample_mlp_gelu":
    n, hw, c = x.shape
    g, r = int(math.isqrt(hw)), pc.downsample_ratio
    pad = (-g) % r
    x = jnp.pad(x.reshape(n, g, g, c), ((0, 0), (0, pad), (0, pad), (0, 0)))
    h = (g + pad) // r
    # [n, h, r, w, r, c] -> [n, h, w, c, r, r]: channel-major 2x2 concatenation (F.unfold order)
    x = x.reshape(n, h, r, h, r, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h * h, c * r * r)
  layers = params["projector"]["layers"]
  keys = sorted(layers, key=int)
  for i, k in enumerate(keys):
    if i > 0:
      x = jax.nn.gelu(x, approximate=False)
    x = linear(layers[k], x)
  return x


def image_layout(cfg: DeepseekVL2Config, spatial_crops) -> np.ndarray:
  """Row index, per image-token position (all images in order), into [tile features (X*P rows); newline; separator].

  spatial_crops: [(num_width_tiles, num_height_tiles)] per image, in the order the tiles are stacked.
  """
  h = w = cfg.tile_grid
  p = h * w
  n_tiles = sum(1 + tw * th for tw, th in spatial_crops)
  newline, sep = n_tiles * p, n_tiles * p + 1
  out, base = [], 0
  for tw, th in spatial_crops:
    glob = []
    for r in range(h):
      glob += [base * p + r * w + c for c in range(w)] + [newline]
    loc = []
    for rr in range(th * h):
      for cc in range(tw * w):
        tile = base + 1 + (rr // h) * tw + cc // w
        loc.append(tile * p + (rr % h) * w + cc % w)
      loc.append(newline)
    out += (glob + [sep] + loc) if cfg.global_view_pos == "head" else (loc + [sep] + glob)
    base += 1 + tw * th
  return np.asarray(out, np.int32)


def image_features(params, cfg: DeepseekVL2Config, pixel_values: jax.Array, layout: jax.Array) -> jax.Array:
  """Tiles [X, C, S, S] and the layout index [N_img] -> image-token embeddings [N_img, E]."""
  feats = project(params, cfg, siglip.forward(params["vision"], cfg.vision, pixel_values))
  table = jnp.concatenate([feats.reshape(-1, feats.shape[-1]), params["image_newline"][None].astype(feats.dtype),
                           params["view_seperator"][None].astype(feats.dtype)], axis=0)
  return jnp.take(table, layout, axis=0)


def embed_inputs(params, cfg: DeepseekVL2Config, input_ids, pixel_values, layout):
  embeds = embed_tokens(params["language_model"], input_ids)
  if pixel_values is not None:
    feats = image_features(params, cfg, pixel_values, layout)
    embeds = merge_image_features(embeds, input_ids, feats[None], cfg.image_token_id)
  return embeds


def forward(params, config: DeepseekVL2Config, input_ids, pixel_values, *, spatial_crops=None, attention_mask=None,
            spec: RectificationSpec | None = None, output_attentions: bool = False, position_ids=None) -> dict:
  """Full forward. pixel_values: all tiles [X, C, S, S] (global view first for each image); spatial_crops: one
  (num_width_tiles, num_height_tiles) per image. Returns {"logits": [B, T, V] float32, "attentions"?}."""
  params = getattr(params, "params", params)
  input_ids = jnp.asarray(input_ids)
  layout = None
  if pixel_values is not None:
    if spatial_crops is None:
      raise ValueError("DeepSeek-VL2 needs spatial_crops (num_width_tiles, num_height_tiles) per image")
    n_tiles = sum(1 + tw * th for tw, th in spatial_crops)
    if pixel_values.shape[0] != n_tiles:
      raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tiles but spatial_crops {list(spatial_crops)} "
                       f"need {n_tiles} (one global view + tw x th local tiles per image)")
    layout = image_layout(config, spatial_crops)
    if not isinstance(input_ids, jax.core.Tracer):
      n_tok = int(np.sum(np.asarray(input_ids) == config.image_token_id))
      if n_tok != layout.shape[0]:
        raise ValueError(f"input_ids hold {n_tok} image tokens (id {config.image_token_id}) but the images' tiles give "
                         f"{layout.shape[0]} positions; the prompt and the images do not match")
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  if position_ids is None:
    position_ids = positions_from_mask(attention_mask)
  embeds = embed_inputs(params, config, input_ids, pixel_values, layout)
  ctx = prompt_context(input_ids, attention_mask, config.image_token_id)
  lm = params["language_model"]
  hidden, _, extras = deepseek_v2.decoder(lm, config.text, embeds, position_ids, ctx, spec=spec,
                                          output_attentions=output_attentions)
  out = {"logits": lm_head(lm, params.get("lm_head"), hidden)}
  out.update(extras)
  return out


def param_shapes(cfg: DeepseekVL2Config) -> dict:
  proj = {str(2 * i): {"weight": s, "bias": (s[0],)} for i, s in enumerate(cfg.projector.linear_shapes())}
  e = cfg.text.hidden_size
  tree = {"vision": siglip.param_shapes(cfg.vision), "projector": {"layers": proj}, "image_newline": (e,),
          "view_seperator": (e,), "language_model": deepseek_v2.param_shapes(cfg.text)}
  if not cfg.text.tie_word_embeddings:
    tree["lm_head"] = {"weight": (cfg.text.vocab_size, e)}
  return tree


def layout_rows(cfg: DeepseekVL2Config, ordinal: jax.Array, crops: jax.Array, n_tiles: int) -> jax.Array:
  """Traced version of `image_layout` for one image per example.

  ordinal [B, T] (index of each position among its row's image tokens), crops [B, 2] (tw, th) -> row index [B, T]
  into the per-example table [n_tiles * P tile features; newline; separator].
  """
  h = w = cfg.tile_grid
  p = h * w
  newline, sep = n_tiles * p, n_tiles * p + 1
  tw, th = crops[:, 0:1], crops[:, 1:2]
  n_glob = h * (w + 1)
  n_loc = th * h * (tw * w + 1)

  def glob(j):
    r, c = j // (w + 1), j % (w + 1)
    return jnp.where(c == w, newline, r * w + c)

  def loc(k):
    row_len = tw * w + 1
    r, c = k // row_len, k % row_len
    tile = 1 + (r // h) * tw + c // w
    return jnp.where(c == tw * w, newline, tile * p + (r % h) * w + c % w)

  j = ordinal
  if cfg.global_view_pos == "head":
    return jnp.where(j < n_glob, glob(j), jnp.where(j == n_glob, sep, loc(jnp.maximum(j - n_glob - 1, 0))))
  return jnp.where(j < n_loc, loc(j), jnp.where(j == n_loc, sep, glob(jnp.maximum(j - n_loc - 1, 0))))


def embed_batched(params, cfg: DeepseekVL2Config, input_ids: jax.Array, tiles: jax.Array, crops: jax.Array):
  """One image per example: tiles [B, X, C, S, S] (global view first, unused tiles anything), crops [B, 2] (tw, th)
  -> embeddings [B, T, E] with the image features at the `<image>` positions (jit-friendly: crops may be traced)."""
  lm = params["language_model"]
  embeds = embed_tokens(lm, input_ids)
  b, x = tiles.shape[:2]
  feats = project(params, cfg, siglip.forward(params["vision"], cfg.vision, tiles.reshape((b * x,) + tiles.shape[2:])))
  e = feats.shape[-1]
  table = jnp.concatenate([feats.reshape(b, -1, e),
                           jnp.broadcast_to(params["image_newline"].astype(feats.dtype), (b, 1, e)),
                           jnp.broadcast_to(params["view_seperator"].astype(feats.dtype), (b, 1, e))], axis=1)
  is_img = input_ids == cfg.image_token_id
  ordinal = jnp.cumsum(is_img, axis=-1) - 1
  rows = layout_rows(cfg, ordinal, crops.astype(jnp.int32), x)
  gathered = jnp.take_along_axis(table, jnp.clip(rows, 0, table.shape[1] - 1)[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered.astype(embeds.dtype), embeds)


# ----------------------------------------------------------------------------------------------------------------
# Family interface (models.family).
# ----------------------------------------------------------------------------------------------------------------


def _dims(self):
  from models.family import DecoderDims

  t = self.text
  return DecoderDims(num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                     num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, hidden_size=t.hidden_size,
                     vocab_size=t.vocab_size, eos_token_id=t.eos_token_id,
                     max_position_embeddings=t.max_position_embeddings)


DeepseekVL2Config.dims = property(_dims, doc="The decoder's dims (MLA: one key/value head per query head after "
                                             "the latent up-projection, head_dim = qk_nope + qk_rope; the "
                                             "use_mla = False variant: its GQA heads).")


IMAGE_MEAN = IMAGE_STD = 0.5  # the official normalisation, every channel (models.deepseek_vl2_processing)


@dataclasses.dataclass(frozen=True)
class DeepseekVL2Normalisation:
  """The image normalisation `models.deepseek_vl2_processing` applies, for tools that show a detector the image
  the model sees (HALC)."""

  image_mean: tuple[float, ...] = (IMAGE_MEAN,) * 3
  image_std: tuple[float, ...] = (IMAGE_STD,) * 3


@dataclasses.dataclass
class DeepseekVL2Processor:
  """What air-jax needs of the official processor: the tokenizer (tiling and tokens: models.deepseek_vl2_processing)
  and the image normalisation."""

  tokenizer: object
  image_processor: DeepseekVL2Normalisation = dataclasses.field(default_factory=DeepseekVL2Normalisation)


def _family():
  from models import chat
  from models import family as family_lib
  from models.deepseek_vl2_processing import encode, user_turn

  class DeepseekVL2Family(family_lib.Family):
    """DeepSeek-VL2: SigLIP tiles -> downsampling projector -> tile/newline layout -> DeepSeek-V2 MLA + MoE."""

    name = "deepseek_vl2"
    model_types = ("deepseek_vl_v2",)
    architectures = ("DeepseekVLV2ForCausalLM",)
    config_types = (DeepseekVL2Config,)

    def parse_config(self, raw):
      return config_from_dict(raw)

    def complete_config(self, config, raw, path):
      # The official processor takes '<image>''s id from the tokenizer, and the released config.json files do
      # not name it (deepseek-vl2-small's vocabulary is smaller than the default id).
      from convert.hf_deepseek_vl2 import tokenizer_image_token_id

      tok_id = tokenizer_image_token_id(path)
      if tok_id is None or tok_id == config.image_token_id:
        return config
      if "image_token_id" in raw:
        raise ValueError(f"{path}: the tokenizer's '<image>' id is {tok_id} but the config uses "
                         f"{config.image_token_id}; set \"image_token_id\": {tok_id} in config.json")
      return dataclasses.replace(config, image_token_id=tok_id)

    def param_shapes(self, config):
      return param_shapes(config)

    def max_image_tokens(self, config):  # the candidate resolution with the most tiles, plus the global view
      return max(config.num_image_tokens(*config.tiles_of(r)) for r in config.candidate_resolutions)

    def max_vision_tiles(self, config):
      return max(1 + w * h for w, h in map(config.tiles_of, config.candidate_resolutions))

    def head_key_role(self, key):
      return {"language.lm_head.weight": "head", "language.model.embed_tokens.weight": "embed"}.get(key)

    def load_params(self, path, config, dtype, sharding=None):
      from convert.hf_deepseek_vl2 import load_params
      from convert.tree_fill import place

      return place(load_params(path, config, dtype), sharding)

    def load_processor(self, path):
      from transformers import AutoTokenizer

      try:
        return DeepseekVL2Processor(tokenizer=AutoTokenizer.from_pretrained(path))
      except Exception as e:  # transformers raises many types here; name the directory
        raise ValueError(f"could not load the tokenizer from {path}: {e}") from e

    def prepare_inputs(self, processor, config, images, prompts, bucket):
      tok = processor.tokenizer
      rows, tiles, crops = [], [], []
      for image, prompt in zip(images, prompts):
        ids, t, c = encode(tok, config, user_turn(prompt), [image])
        rows.append(ids)
        tiles.append(t)
        crops.append(c[0])
      t_len = max(len(r) for r in rows)
      pad = chat.pad_token_id(tok)
      ids = np.full((len(rows), t_len), pad, np.int32)
      mask = np.zeros((len(rows), t_len), np.int32)
      for i, r in enumerate(rows):
        ids[i, t_len - len(r):], mask[i, t_len - len(r):] = r, 1
      ids, mask = chat.bucket_left(ids, mask, bucket, pad)
      x = max(t.shape[0] for t in tiles)
      padded = np.zeros((len(tiles), x) + tiles[0].shape[1:], np.float32)
      for i, t in enumerate(tiles):
        padded[i, : t.shape[0]] = t
      return {"input_ids": ids, "attention_mask": mask,
              "vision": {"tiles": padded, "crops": np.asarray(crops, np.int32)}}

    def map_pixels(self, config, vision, fn):  # the tiles [B, X, C, S, S] (global views and local tiles)
      return None if vision is None else dict(vision, tiles=fn(vision["tiles"]))

    def embed(self, params, config, input_ids, attention_mask, vision):
      if vision is None:
        return embed_tokens(params["language_model"], input_ids)
      return embed_batched(params, config, input_ids, vision["tiles"], vision["crops"])

    def embed_tokens(self, params, config, ids):
      return embed_tokens(params["language_model"], ids)

    def decoder(self, params, config, embeds, positions, ctx, **kw):
      return deepseek_v2.decoder(params["language_model"], config.text, embeds, positions, ctx, **kw)

    def init_cache(self, params, config, batch, size, dtype):
      return deepseek_v2.init_cache(config.text, batch, size, dtype)

    def logits(self, params, config, hidden):
      return lm_head(params["language_model"], params.get("lm_head"), hidden)

    def exit_logits(self, params, config, hidden, final_norm: bool):
      return early_exit_logits(params["language_model"], params.get("lm_head"), config.text, hidden, final_norm)

    def value_norms(self, params, config, states):
      return deepseek_v2.value_norms(params["language_model"], config.text, states)

    def qk_factors(self, params, config, layer: int, fold_norm: bool = True):
      return deepseek_v2.qk_factors(params["language_model"], config.text, layer, fold_norm)

  return family_lib.register(DeepseekVL2Family())


FAMILY = _family()
