"""Qwen2.5-VL vision tower (transformers `Qwen2_5_VisionTransformerPretrainedModel`): window-attention ViT.

Flat patches of every image of a batch form one sequence; blocks attend within windows of
`window_size // patch_size` patches per side (grouped by 2x2 merge units), except the blocks listed in
`fullatt_block_indexes`, which attend within each image (each frame). 2D rotary embeddings (height, width),
RMSNorm + SwiGLU blocks, and a merger (RMSNorm, 2x2 concat, MLP) give one feature per 2x2 patches.

Params (transformers names, except that the stacked blocks are called `layers`: the checkpoint's
`visual.blocks.{i}.X` is `visual.layers.X[i]`, see models.qwen2_5_vl.Qwen25VLFamily.stack_renames):
  patch_embed.proj.weight [E, C, Tp, p, p]
  layers.{norm1, norm2, attn.{qkv [3E, E] + bias, proj}, mlp.{gate_proj, up_proj, down_proj} (+ biases)}
  merger.{ln_q.weight [E], mlp.0 [4E, 4E], mlp.2 [O, 4E]}
Legend: N patches of all images, M = N / merge^2 merged units, E width, O output (text) width, S segments
(windows or images), L longest segment, nh heads, hd head dim.
The index plan (window order, segments) depends only on `image_grid_thw`, so it is computed in numpy
(`vision_plan`) and enters the compiled function as integer arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models.config import _check
from models.layers import activation, linear, rms_norm

_EPS = 1e-6  # transformers hard-codes the vision RMSNorm epsilon
# Planning figure (air_jax.plan): a 1280-token image, Qwen's recommended max_pixels = 1280 * 28 * 28. The processor
# default (max_pixels 12845056) allows 16384 tokens; pass --prompt-tokens to plan for those.
PLAN_IMAGE_TOKENS = 1280


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """transformers `Qwen2_5_VLVisionConfig` (fields it uses)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  tokens_per_second: float = 2.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def num_attention_heads(self) -> int:  # the name other towers use (air_jax.plan reads it)
    return self.num_heads

  @property
  def num_patches(self) -> int:
    """Patches of the largest image air_jax.plan assumes: PLAN_IMAGE_TOKENS merged tokens (the image size is
    the processor's choice, min/max_pixels, not the checkpoint's)."""
    return PLAN_IMAGE_TOKENS * self.spatial_merge_size**2


def vision_config_from_dict(d: dict) -> QwenVisionConfig:
  model_type = d.get("model_type", "qwen2_5_vl")
  _check(model_type in ("qwen2_5_vl", "qwen2_5_vl_vision"), "vision_config.model_type", model_type,
         "'qwen2_5_vl' (the Qwen2.5-VL vision tower)")
  act = d.get("hidden_act", "silu")
  activation(act)
  rope = d.get("rope_parameters") or {}
  cfg = QwenVisionConfig(
      depth=int(d.get("depth", 32)),
      hidden_size=int(d.get("hidden_size", 1280)),
      intermediate_size=int(d.get("intermediate_size", 3420)),
      num_heads=int(d.get("num_heads", 16)),
      in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
      patch_size=int(d.get("patch_size", 14)),
      temporal_patch_size=int(d.get("temporal_patch_size", 2)),
      spatial_merge_size=int(d.get("spatial_merge_size", 2)),
      window_size=int(d.get("window_size", 112)),
      fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))),
      out_hidden_size=int(d.get("out_hidden_size", 3584)),
      hidden_act=act,
      rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
      tokens_per_second=float(d.get("tokens_per_second", 2.0)),
  )
  _check(cfg.hidden_size % cfg.num_heads == 0 and cfg.head_dim % 4 == 0, "vision_config.num_heads", cfg.num_heads,
         f"a divisor of hidden_size={cfg.hidden_size} leaving a head dim divisible by 4")
  units = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
  _check(units >= 1, "vision_config.window_size", cfg.window_size,
         f"at least spatial_merge_size * patch_size = {cfg.spatial_merge_size * cfg.patch_size}")
  return cfg


def param_shapes(cfg: QwenVisionConfig) -> dict:
  e, i, n, m = cfg.hidden_size, cfg.intermediate_size, cfg.depth, cfg.hidden_size * cfg.spatial_merge_size**2

  def lin(o, k):
    return {"weight": (n, o, k), "bias": (n, o)}

  return {
      "patch_embed": {"proj": {"weight": (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                                          cfg.patch_size)}},
      "layers": {
          "norm1": {"weight": (n, e)}, "norm2": {"weight": (n, e)},
          "attn": {"qkv": lin(3 * e, e), "proj": lin(e, e)},
          "mlp": {"gate_proj": lin(i, e), "up_proj": lin(i, e), "down_proj": lin(e, i)},
      },
      "merger": {"ln_q": {"weight": (e,)},
                 "mlp": {"0": {"weight": (m, m), "bias": (m,)}, "2": {"weight": (cfg.out_hidden_size, m),
                                                                      "bias": (cfg.out_hidden_size,)}}},
  }


def check_grid(cfg: QwenVisionConfig, grid_thw) -> np.ndarray:
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  m = cfg.spatial_merge_size
  bad = [tuple(int(x) for x in g) for g in grid if g[0] < 1 or g[1] < m or g[2] < m or g[1] % m or g[2] % m]
  if bad:
    raise ValueError(f"image_grid_thw rows {bad} are invalid: height and width (in patches) must be positive "
                     f"multiples of spatial_merge_size={m}; use the Qwen2.5-VL image processor")
  return grid


def _segments(lengths: list[int], n: int, num_segments: int | None = None, seg_len: int | None = None):
  """Gather plan for consecutive segments of the given lengths (zero lengths dropped) over n rows.

  Rows past sum(lengths) (batch padding) form extra segments of at most seg_len rows among themselves; segment
  rows past the last real one are all invalid (never read back). Returns idx [S, L] (row of each slot, 0 for
  padding), valid [S, L], inv [n] (flat slot of each row).
  """
  lengths = [x for x in lengths if x > 0]
  mx = max(lengths) if seg_len is None else seg_len
  pad = n - sum(lengths)
  lengths = lengths + [min(mx, pad - i) for i in range(0, pad, mx)]
  s = len(lengths) if num_segments is None else num_segments
  idx, valid, inv = np.zeros((s, mx), np.int32), np.zeros((s, mx), bool), np.zeros(n, np.int32)
  start = 0
  for j, k in enumerate(lengths):
    idx[j, :k] = np.arange(start, start + k)
    valid[j, :k] = True
    inv[start:start + k] = j * mx + np.arange(k)
    start += k
  return idx, valid, inv


def _layout(cfg: QwenVisionConfig, grid: np.ndarray):
  """rot_pos [N, 2] (processor order), window_index [M], window segment lengths, full segment lengths."""
  m = cfg.spatial_merge_size
  unit = m * m
  win = cfg.window_size // m // cfg.patch_size
  rot, window_index, window_lens, full_lens = [], [], [], []
  offset = 0
  for t, h, w in grid.tolist():
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    rot.append(np.tile(np.stack([block(hh), block(ww)], -1), (t, 1)))
    gh, gw = h // m, w // m
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = win - gh % win, win - gw % win  # transformers pads by a whole window when already divisible
    nh, nw = (gh + ph) // win, (gw + pw) // win
    padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
    window_lens += [x for x in ((padded >= 0).sum(-1).reshape(-1) * unit).tolist() if x]
    flat = padded.reshape(-1)
    window_index.append(flat[flat >= 0] + offset)
    full_lens += [h * w] * t
    offset += t * gh * gw
  return np.concatenate(rot), np.concatenate(window_index), window_lens, full_lens


def vision_plan(cfg: QwenVisionConfig, grid_thw, pad: dict | None = None) -> dict:
  """Index arrays for a set of images (transformers' position ids, window index and sequence lengths).

  rot_pos [N, 2] (h, w of each patch, in window order); perm [N] (patch order -> window order); unperm [M]
  (window order of merged units -> image order); window_{idx, valid, inv} and full_{idx, valid, inv}: segment
  gather plans (see `_segments`) over the window-ordered sequence. `pad` = {"n", "window": (S, L), "full": (S, L)}
  pads the plan to N = n patches and those segment shapes (batch padding, see `batch_plans`).
  """
  grid = check_grid(cfg, grid_thw)
  unit = cfg.spatial_merge_size**2
  rot, window_index, window_lens, full_lens = _layout(cfg, grid)
  n_real = rot.shape[0]
  n = n_real if pad is None else pad["n"]
  window_index = np.concatenate([window_index, np.arange(n_real // unit, n // unit)])  # padding stays in place
  perm = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
  rot = np.concatenate([rot, np.zeros((n - n_real, 2), rot.dtype)])
  plan = {"rot_pos": rot[perm].astype(np.int32), "perm": perm.astype(np.int32),
          "unperm": np.argsort(window_index).astype(np.int32)}
  for name, lens in (("window", window_lens), ("full", full_lens)):
    shape = (None, None) if pad is None else pad[name]
    idx, valid, inv = _segments(lens, n, *shape)
    plan.update({f"{name}_idx": idx, f"{name}_valid": valid, f"{name}_inv": inv})
  return plan


def batch_plans(cfg: QwenVisionConfig, grids: list) -> dict:
  """Plans of several examples (each a list of image grids), padded to one shape and stacked on a batch axis.

  Also returns "valid_units" [B, Mmax] (merged units that are real features).
  """
  grids = [check_grid(cfg, g) for g in grids]
  unit = cfg.spatial_merge_size**2
  n = max(int(g.prod(-1).sum()) for g in grids)
  shapes = {}
  for name in ("window", "full"):
    lens = [_layout(cfg, g)[2 if name == "window" else 3] for g in grids]
    seg_len = max(max(x) for x in lens)
    count = max(len(x) + -(-(n - sum(x)) // seg_len) for x in lens)
    shapes[name] = (count, seg_len)
  plans = [vision_plan(cfg, g, dict(n=n, **shapes)) for g in grids]
  out = {k: np.stack([p[k] for p in plans]) for k in plans[0]}
  real = np.array([int(g.prod(-1).sum()) // unit for g in grids])
  out["valid_units"] = np.arange(n // unit)[None, :] < real[:, None]
  return out


def _rotary(cfg: QwenVisionConfig, rot_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [N, hd] (float32): h positions rotate the first quarter of frequencies' slots, w the second."""
  quarter = cfg.head_dim // 2
  inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter)))
  freqs = rot_pos.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [N, 2, hd/4]
  freqs = freqs.reshape(freqs.shape[0], -1)
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb), jnp.sin(emb)


def _rope(x, cos, sin):
  """x [N, nh, hd] rotated in float32 (rotate-half), cast back."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
  return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


def _segment_attention(q, k, v, idx, valid, inv):
  """Softmax attention within segments: q/k/v [N, nh, hd] -> [N, nh, hd]."""
  n, nh, hd = q.shape
  qs, ks, vs = (jnp.take(a, idx, axis=0) for a in (q, k, v))  # [S, L, nh, hd]
  scores = jnp.einsum("sqhd,skhd->shqk", qs, ks).astype(jnp.float32) * (hd**-0.5)
  scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("shqk,skhd->sqhd", probs, vs)
  return jnp.take(out.reshape(-1, nh, hd), inv, axis=0)


def _block(cfg: QwenVisionConfig, p, x, cos, sin, window, full, is_full):
  n, e = x.shape
  nh, hd = cfg.num_heads, cfg.head_dim
  h = rms_norm(p["norm1"], x, _EPS)
  qkv = linear(p["attn"]["qkv"], h).reshape(n, 3, nh, hd)
  q, k, v = _rope(qkv[:, 0], cos, sin), _rope(qkv[:, 1], cos, sin), qkv[:, 2]
  o = jax.lax.cond(is_full, lambda: _segment_attention(q, k, v, *full), lambda: _segment_attention(q, k, v, *window))
  x = x + linear(p["attn"]["proj"], o.reshape(n, e))
  h = rms_norm(p["norm2"], x, _EPS)
  m = p["mlp"]
  h = linear(m["down_proj"], activation(cfg.hidden_act)(linear(m["gate_proj"], h)) * linear(m["up_proj"], h))
  return x + h


def forward(params: dict, cfg: QwenVisionConfig, pixel_values: jax.Array, plan: dict) -> jax.Array:
  """Flat patches pixel_values [N, C * Tp * p * p] -> merged features [M, O] in image (processor) order."""
  w = params["patch_embed"]["proj"]["weight"]
  dtype = w.dtype
  if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
    raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the Qwen2.5-VL vision tower takes flat "
                     f"patches [num_patches, {cfg.patch_dim}] (channels x temporal_patch_size x patch_size^2)")
  if pixel_values.shape[0] != plan["perm"].shape[0]:
    raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but image_grid_thw describes "
                     f"{plan['perm'].shape[0]}; pass the image_grid_thw the processor returned with these pixels")
  x = jnp.einsum("nk,ek->ne", pixel_values.astype(dtype), w.reshape(w.shape[0], -1))
  x = jnp.take(x, plan["perm"], axis=0)
  cos, sin = _rotary(cfg, plan["rot_pos"])
  window = (plan["window_idx"], plan["window_valid"], plan["window_inv"])
  full = (plan["full_idx"], plan["full_valid"], plan["full_inv"])
  is_full = jnp.isin(jnp.arange(cfg.depth), jnp.asarray(cfg.fullatt_block_indexes, jnp.int32))

  def step(h, xs):
    p, f = xs
    return _block(cfg, p, h, cos, sin, window, full, f), None

  x, _ = jax.lax.scan(step, x, (params["layers"], is_full))
  mp = params["merger"]
  x = rms_norm(mp["ln_q"], x, _EPS).reshape(-1, cfg.hidden_size * cfg.spatial_merge_size**2)
  x = linear(mp["mlp"]["2"], jax.nn.gelu(linear(mp["mlp"]["0"], x), approximate=False))
  return jnp.take(x, plan["unperm"], axis=0)
