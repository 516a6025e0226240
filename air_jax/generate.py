"""`generate(params, air_cfg, image, prompt)`: chat template, batching, bucketing, sharding, decoding, text."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import decoding
from air_jax.backend import batch_sharding, data_mesh, replicated, select_devices
from air_jax.loading import LoadedModel
from models import chat
from models.chat import LLAVA_15_CHAT_TEMPLATE, LLAVA_15_TEMPLATE  # noqa: F401 (re-exported)
from models.family import family_of
from models.spec import RectificationSpec


@dataclasses.dataclass
class Generation:
  """Output of `generate`. Lists follow the input order; `text` is the single string for a single input.

  token_ids [B, N] (pad after EOS), num_tokens [B] (EOS included), prompt_ids [B, T] (left padded),
  scores [B, N, V] raw logits per step (output_scores), segment_mass [B, N, L, H, 3] attention mass of the
  generating row on system / image / text keys per layer and head (output_attention_stats).
  """

  texts: list[str]
  token_ids: np.ndarray
  num_tokens: np.ndarray
  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  scores: np.ndarray | None = None
  segment_mass: np.ndarray | None = None

  @property
  def text(self) -> str:
    return self.texts[0]


def _load_image(img):
  from PIL import Image

  if isinstance(img, (list, tuple)):  # several images in one prompt (Qwen2.5-VL, InternVL)
    return [_load_image(x) for x in img]
  if isinstance(img, (str, os.PathLike)):
    try:
      with Image.open(img) as im:
        return im.convert("RGB")
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {os.fspath(img)!r}: {e}") from e
  if isinstance(img, np.ndarray):
    arr = img
    if arr.dtype != np.uint8:
      arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")
  if hasattr(img, "convert"):
    return img.convert("RGB")
  raise TypeError(f"image must be a PIL image, a numpy array or a path, not {type(img).__name__}")


format_prompt = chat.format_prompt
pad_token_id = chat.pad_token_id


def eos_token_ids(config, tokenizer) -> tuple[int, ...]:
  """Ids that end a generation: the model config's EOS ids plus the tokenizer's."""
  extra = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  return tuple(sorted(set(config.dims.eos_token_id) | extra))


def prepare_inputs(processor, images: Sequence, prompts: Sequence[str], bucket: int = 64, config=None):
  """(input_ids [B, T], attention_mask [B, T], vision) of a batch, left padded, T a multiple of `bucket`.

  `vision` is the family's image input (LLaVA-1.5: pixel_values [B, C, H, W]; others: a dict of arrays with a
  leading batch axis). `config` selects the family (default LLaVA-1.5).
  """
  from models.llava import FAMILY

  fam = FAMILY if config is None else family_of(config)
  batch = fam.prepare_inputs(processor, config, list(images), list(prompts), bucket)
  return batch["input_ids"], batch["attention_mask"], batch["vision"]


def _spec_for(air_cfg, config) -> RectificationSpec | None:
  if air_cfg is None or isinstance(air_cfg, RectificationSpec):
    return air_cfg
  if hasattr(air_cfg, "compile"):
    return air_cfg.compile(config)
  raise TypeError(f"air_cfg must be None, an AIRConfig or a RectificationSpec, not {type(air_cfg).__name__}")


_PLACED: dict = {}


def _on_devices(params, mesh) -> bool:
  """True when every param already lives on exactly the mesh's devices (e.g. loaded sharded): keep its layout."""
  devs = set(mesh.devices.flat)
  return all(isinstance(x, jax.Array) and x.sharding.device_set == devs for x in jax.tree.leaves(params))


def _place_params(params, mesh, config=None):
  """Replicates params over the mesh once per (params object, mesh).

  On CPU the decoder layers are also split into one buffer per layer (the family's `per_layer_params`): XLA:CPU
  decodes several times faster that way. This holds a second copy of the decoder weights while the stacked
  params are alive.
  """
  key = (id(params), tuple(d.id for d in mesh.devices.flat))
  hit = _PLACED.get(key)
  if hit is not None and hit[0] is params:
    return hit[1]
  placed = params
  if mesh.devices.flat[0].platform == "cpu":
    from models.llava import FAMILY

    placed = (FAMILY if config is None else family_of(config)).per_layer_params(params)
  if not _on_devices(params, mesh):
    placed = jax.device_put(placed, replicated(mesh))
  _PLACED.clear()
  _PLACED[key] = (params, placed)
  return placed


def generate(params: LoadedModel, air_cfg, image, prompt, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | jax.Array = 0,
             output_scores: bool = False, output_attention_stats: bool = False, backend: str | None = None,
             bucket: int = 64, debug: bool = False, devices: Sequence | None = None) -> Generation:
  """Generates a caption/answer for each (image, prompt) pair.

  Args:
    params: the object returned by `air_jax.load_pretrained` (params, config and processor).
    air_cfg: None (plain decoding), an `AIRConfig`, or a compiled `RectificationSpec`.
    image: a PIL image, an array [H, W, 3], a path, or a list of them (an element may be a list of several
      images for one prompt, with families that take several: Qwen2.5-VL, InternVL).
    prompt: a string or a list (one per image; a single string is used for every image).
    max_new_tokens: N, the number of tokens generated at most (rows stop at EOS).
    do_sample, temperature, top_k, top_p, seed: sampling (default greedy); `seed` may be a PRNG key.
    output_scores: also return the raw logits of each step.
    output_attention_stats: also return the per-step attention mass on system / image / text keys.
    backend: "cpu" | "gpu" | "tpu" (default: JAX's default). The batch is sharded over its local devices.
    bucket: prompt lengths are padded up to a multiple of this, so repeated calls reuse one compilation.
    debug: run a Python loop over the jitted step instead of one compiled while_loop (same result).
    devices: explicit devices to shard the batch over (overrides `backend`).

  Returns:
    A Generation with the decoded texts (special tokens removed), token ids and optional outputs.
  """
  _check_model(params)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  config = params.config
  devices = list(devices) if devices is not None else select_devices(backend)
  ids, mask, pixels, b = _prepare(params, image, prompt, bucket, devices)
  spec = _spec_for(air_cfg, config)
  run = decoding.generate_tokens_debug if debug else decoding.generate_tokens_jit
  out = _run(params, run, spec, ids, mask, pixels, devices, do_sample=do_sample, temperature=temperature,
             top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens, output_scores=output_scores,
             output_stats=output_attention_stats)
  return _to_generation(params, out, ids, mask, b)


def _run(params: LoadedModel, run, spec, ids, mask, pixels, devices, *, do_sample, temperature, top_k, top_p, seed,
         max_new_tokens, output_scores, output_stats):
  """Places the (padded) batch on the devices and runs `run` (a decoding.generate_tokens variant)."""
  config, tok = params.config, params.processor.tokenizer
  eos, pad_id = eos_token_ids(config, tok), pad_token_id(tok)
  sv = decoding.SamplingValues.make(seed, temperature, top_k, top_p)
  kw = dict(max_new_tokens=max_new_tokens, sampling=decoding.Sampling(greedy=not do_sample), eos_ids=eos,
            pad_id=pad_id, output_scores=output_scores, output_stats=output_stats)
  mesh = data_mesh(devices)
  p = _place_params(params.params, mesh, config)
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.ndim)), t)
  out = run(p, config, shard(ids), shard(mask), shard(pixels), spec, sv, **kw)
  return jax.tree.map(np.asarray, out)


def _to_generation(params: LoadedModel, out: dict, ids, mask, b: int) -> Generation:
  """Drops the batch padding rows and decodes the texts."""
  tok = params.processor.tokenizer
  tokens, num = out["tokens"][:b], out["num_tokens"][:b]
  texts = [tok.decode(tokens[i, : num[i]], skip_special_tokens=True).strip() for i in range(b)]
  stats = out.get("segment_mass")
  if stats is not None:
    stats = np.transpose(stats[:, :, :b], (2, 0, 1, 3, 4))  # [N, L, B, H, 3] -> [B, N, L, H, 3]
  scores = out["scores"][:b] if "scores" in out else None
  return Generation(texts=texts, token_ids=tokens, num_tokens=num, prompt_ids=ids[:b], prompt_mask=mask[:b],
                    scores=scores, segment_mass=stats)


def _prepare(params, image, prompt, bucket, devices):
  """Images/prompts -> padded numpy inputs (batch padded to a multiple of the device count) and the real size."""
  images = list(image) if isinstance(image, (list, tuple)) else [image]
  prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
  if len(prompts) != len(images):
    raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
  if not images:
    raise ValueError("no images given")
  ids, mask, pixels = prepare_inputs(params.processor, [_load_image(i) for i in images], prompts, bucket,
                                     config=params.config)
  b = ids.shape[0]
  extra = (-b) % len(devices)  # copies of row 0, dropped afterwards
  if extra:
    ids, mask, pixels = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], extra, 0)]), (ids, mask, pixels))
  return ids, mask, pixels, b


def _check_model(params):
  if not isinstance(params, LoadedModel) or params.processor is None:
    raise TypeError("generate needs the object returned by air_jax.load_pretrained(path) (params, config and "
                    "processor); got " + type(params).__name__)


def stack_specs(specs: Sequence[RectificationSpec]) -> RectificationSpec:
  """Stacks specs of one structure (same op groups compiled in) along a new leading sweep axis."""
  structures = {jax.tree.structure(s) for s in specs}
  if len(structures) != 1:
    raise ValueError("the configs of a sweep must compile to specs of one structure (the same ops switched on); "
                     f"got {len(structures)} different structures")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *specs)


_SWEEP_STATIC = ("config", "max_new_tokens", "sampling", "eos_ids", "pad_id", "output_scores", "output_stats")


@functools.partial(jax.jit, static_argnames=_SWEEP_STATIC)
def _sweep_jit(params, config, ids, mask, pixels, specs, sv, **kw):
  one = lambda spec: decoding.generate_tokens(params, config, ids, mask, pixels, spec, sv, **kw)
  return jax.vmap(one)(specs)


def generate_sweep(params: LoadedModel, air_cfgs: Sequence, image, prompt, *, max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int | jax.Array = 0, bucket: int = 64, backend: str | None = None) -> list[Generation]:
  """One compiled, vmapped call for several AIR configs (a hyperparameter sweep, e.g. 8 values of lambda).

  Every config must switch on the same ops (values may differ). Returns one Generation per config, equal to
  calling `generate` with each config in turn.
  """
  _check_model(params)
  if not air_cfgs:
    raise ValueError("air_cfgs is empty")
  devices = select_devices(backend)
  specs = stack_specs([_spec_for(c, params.config) for c in air_cfgs])
  ids, mask, pixels, b = _prepare(params, image, prompt, bucket, devices)
  out = _run(params, _sweep_jit, specs, ids, mask, pixels, devices, do_sample=do_sample, temperature=temperature,
             top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens, output_scores=False,
             output_stats=False)
  return [_to_generation(params, jax.tree.map(lambda x, i=i: x[i], out), ids, mask, b) for i in range(len(air_cfgs))]


def generate_inputs(params: LoadedModel, image, prompt, bucket: int = 64):
  """The (input_ids, attention_mask, pixel_values) numpy arrays `generate` feeds the model (one device)."""
  ids, mask, pixels, _ = _prepare(params, image, prompt, bucket, devices=[None])
  return ids, mask, pixels
