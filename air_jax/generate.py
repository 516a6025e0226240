"""`generate(params, method_cfg, image, prompt)`: chat template, batching, bucketing, sharding, decoding, text."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import decoding
from air_jax.backend import batch_sharding, data_mesh, replicated, select_devices
from air_jax.images import load_image
from air_jax.limits import check_lengths, check_max_new_tokens, check_sampling
from air_jax.loading import LoadedModel
from models import chat
from models.chat import LLAVA_15_CHAT_TEMPLATE, LLAVA_15_TEMPLATE  # noqa: F401 (re-exported)
from models.family import family_of
from models.spec import RectificationSpec


@dataclasses.dataclass
class Generation:
  """Output of `generate`. Lists follow the input order; `text` is the single string for a single input.

  token_ids [B, N] (pad after EOS), num_tokens [B] (EOS included), prompt_ids [B, T] (left padded),
  scores [B, N, V] the logits the sampler saw per step (raw logits, or the method's combined ones; output_scores), segment_mass [B, N, L, H, 3] attention mass of the
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


def _load_image(img, name: str = "image"):
  if isinstance(img, (list, tuple)):  # several images in one prompt (Qwen2.5-VL, InternVL)
    return [_load_image(x, name) for x in img]
  return load_image(img, name)


format_prompt = chat.format_prompt
pad_token_id = chat.pad_token_id


def eos_token_ids(config, tokenizer, extra_ids=()) -> tuple[int, ...]:
  """Ids that end a generation: the model config's EOS ids, the tokenizer's, and `extra_ids` (a LoadedModel's
  `generation_eos`, from its generation_config.json)."""
  extra = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  return tuple(sorted(set(config.dims.eos_token_id) | extra | set(extra_ids)))


def prepare_inputs(processor, images: Sequence, prompts: Sequence[str], bucket: int = 64, config=None):
  """(input_ids [B, T], attention_mask [B, T], vision) of a batch, left padded, T a multiple of `bucket`.

  `vision` is the family's image input (LLaVA-1.5: pixel_values [B, C, H, W]; others: a dict of arrays with a
  leading batch axis). `config` selects the family (default LLaVA-1.5).
  """
  from models.llava import FAMILY

  fam = FAMILY if config is None else family_of(config)
  batch = fam.prepare_inputs(processor, config, list(images), list(prompts), bucket)
  return batch["input_ids"], batch["attention_mask"], batch["vision"]


def _method_for(method_cfg, config):
  """Any decoding method (None, a registered name, a method config, an AIRConfig, a spec) -> CompiledMethod."""
  from air_jax import methods

  if isinstance(method_cfg, str):
    method_cfg = methods.make(method_cfg)
  return methods.as_compiled(method_cfg, config)


_PLACED: dict = {}


def _mesh_for(params, devices):
  """The mesh the batch is split over: the params' (data, model) mesh when loaded sharded, else `devices`."""
  from air_jax.sharding import params_mesh

  return params_mesh(params.params) or data_mesh(devices)


def _data_shards(params, devices) -> int:
  """How many ways the batch is split (the mesh's data axis): the batch is padded to a multiple of this."""
  return _mesh_for(params, devices).shape["data"]


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


def generate(params: LoadedModel, method_cfg, image, prompt, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | jax.Array = 0,
             output_scores: bool = False, output_attention_stats: bool = False, backend: str | None = None,
             bucket: int = 64, debug: bool = False, devices: Sequence | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, protocol=None) -> Generation:
  """Generates a caption/answer for each (image, prompt) pair.

  Args:
    params: the object returned by `air_jax.load_pretrained` (params, config and processor).
    method_cfg: the decoding method: None (plain decoding), a registered name ("greedy", "vcd", ...), a method
      config (`air_jax.methods.make(name, **overrides)`), an `AIRConfig`, or a compiled `RectificationSpec`.
    image: a PIL image, an array [H, W, 3], a path, or a list of them (an element may be a list of several
      images for one prompt, with families that take several: Qwen2.5-VL, InternVL).
    prompt: a string or a list (one per image; a single string is used for every image).
    max_new_tokens: N, the number of tokens generated at most (rows stop at EOS).
    do_sample, temperature, top_k, top_p, seed: sampling (default greedy); `seed` may be a PRNG key. A row's
      draws depend on the key and its position in the batch, not on the other rows.
    output_scores: also return the raw logits of each step.
    output_attention_stats: also return the per-step attention mass on system / image / text keys.
    backend: "cpu" | "gpu" | "tpu" (default: JAX's default). The batch is sharded over its local devices.
    bucket: prompt lengths are padded up to a multiple of this, so repeated calls reuse one compilation.
    debug: run a Python loop over the jitted step instead of one compiled while_loop (same result).
    devices: explicit devices to shard the batch over (overrides `backend`).
    num_beams, length_penalty, early_stopping: beam search when num_beams > 1 (air_jax.beam_search, as
      transformers' `num_beams` generate with early_stopping True, False or "never"), with any
      method that only edits attention (AIR, AIR*, AD-HH, head ablations).
    protocol: None, a name ("default", "official-air") or an `air_jax.protocol.Protocol`: the prompt template,
      image padding and bucket of that protocol (its bucket replaces `bucket`); with `group_by_length` prompts of
      different lengths run as separate equal-length groups (no padding), results in input order.

  Returns:
    A Generation with the decoded texts (special tokens removed), token ids and optional outputs.
  """
  _check_model(params)
  max_new_tokens = check_max_new_tokens(max_new_tokens)
  if do_sample:
    check_sampling(temperature, top_k, top_p)
  if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
  config = params.config
  devices = list(devices) if devices is not None else select_devices(backend)
  if protocol is not None:
    from air_jax.protocol import get_protocol

    protocol = get_protocol(protocol)
    bucket = protocol.bucket
  ids, mask, pixels, b = _prepare(params, image, prompt, bucket, devices, protocol,
                                  shards=_data_shards(params, devices))
  if protocol is not None and protocol.group_by_length and len(set(mask[:b].sum(1).tolist())) > 1:
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
              top_p=top_p, seed=seed, output_scores=output_scores, output_attention_stats=output_attention_stats,
              debug=debug, devices=devices, num_beams=num_beams, length_penalty=length_penalty,
              early_stopping=early_stopping, protocol=protocol)
    return _generate_groups(params, method_cfg, image, prompt, mask[:b].sum(1), kw)
  extra = {}
  if protocol is not None:
    extra["finished_pad"] = protocol.finished_pad_id(params.processor.tokenizer)
  method = _method_for(method_cfg, config)
  _check_filler_rows(method, b, ids.shape[0])
  check_lengths(config, ids.shape[0] * method.plan.num_views, ids.shape[1], max_new_tokens, params.dtype.itemsize,
                devices, real_prompt_len=int(mask.sum(-1).max()))
  if method.plan.searches:  # the method brings its own search (e.g. OPERA)
    out = _run_search(params, method, ids, mask, pixels, devices, num_beams=num_beams, max_new_tokens=max_new_tokens,
                      sampling=do_sample or output_scores or output_attention_stats)
    return _to_generation(params, out, ids, mask, b)
  if num_beams != 1:
    out = _run_beams(params, method, ids, mask, pixels, devices, num_beams=num_beams, length_penalty=length_penalty,
                     early_stopping=early_stopping,
                     max_new_tokens=max_new_tokens, b=b, sampling=do_sample or output_scores or output_attention_stats)
    return _to_generation(params, out, ids, mask, b)
  run = decoding.generate_tokens_debug if debug else decoding.generate_tokens_jit
  out = _run(params, run, method, ids, mask, pixels, devices, do_sample=do_sample, temperature=temperature,
             top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens, output_scores=output_scores,
             output_stats=output_attention_stats, **extra)
  return _to_generation(params, out, ids, mask, b)


def _generate_groups(params: LoadedModel, method_cfg, image, prompt, lengths, kw) -> Generation:
  """`generate` over groups of equal prompt length (no padding), merged back into input order."""
  from air_jax.protocol import length_groups

  images = list(image) if isinstance(image, (list, tuple)) else [image]
  prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
  groups = length_groups(lengths)
  outs = [generate(params, method_cfg, [images[i] for i in g], [prompts[i] for i in g], **kw) for g in groups]
  order = np.argsort(np.concatenate(groups), kind="stable")
  t = max(o.prompt_ids.shape[1] for o in outs)
  pad = pad_token_id(params.processor.tokenizer)
  left = lambda x, v: np.pad(x, ((0, 0), (t - x.shape[1], 0)), constant_values=v)
  cat = lambda xs: None if xs[0] is None else np.concatenate(xs)[order]
  texts = [t_ for o in outs for t_ in o.texts]
  return Generation(texts=[texts[k] for k in order], token_ids=cat([o.token_ids for o in outs]),
                    num_tokens=cat([o.num_tokens for o in outs]),
                    prompt_ids=cat([left(o.prompt_ids, pad) for o in outs]),
                    prompt_mask=cat([left(o.prompt_mask, 0) for o in outs]),
                    scores=cat([o.scores for o in outs]), segment_mass=cat([o.segment_mass for o in outs]))


def _run(params: LoadedModel, run, method, ids, mask, pixels, devices, *, do_sample, temperature, top_k, top_p, seed,
         max_new_tokens, output_scores, output_stats, finished_pad: int | None = None):
  """Places the (padded) batch on the devices and runs `run` (a decoding.generate_tokens variant).

  finished_pad: the token fed to rows that have ended (default: the tokenizer's pad id).
  """
  config, tok = params.config, params.processor.tokenizer
  eos, pad_id = eos_token_ids(config, tok, params.generation_eos), pad_token_id(tok)
  pad_id = pad_id if finished_pad is None else finished_pad
  sv = decoding.SamplingValues.make(seed, temperature, top_k, top_p)
  kw = dict(max_new_tokens=max_new_tokens, sampling=decoding.Sampling(greedy=not do_sample), eos_ids=eos,
            pad_id=pad_id, output_scores=output_scores, output_stats=output_stats)
  mesh = _mesh_for(params, devices)  # sharded params: their (data, model) mesh
  p = _place_params(params.params, mesh, config)
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.ndim)), t)
  out = run(p, config, shard(ids), shard(mask), shard(pixels), method, sv, **kw)
  return jax.tree.map(np.asarray, out)


def check_decoding_options(method, *, num_beams: int = 1, sampling: bool = False) -> None:
  """Raises the ValueError `generate` would raise for this compiled method with these options, before any work.

  A method with its own search (OPERA, HALC, FarSight official) takes its beam width from its config and is
  deterministic; beam search (num_beams > 1) runs only methods that edit attention and is deterministic too.
  `sampling`: do_sample, output_scores or output_attention_stats asked for.
  """
  from air_jax.methods.base import Plan

  plan = method.plan
  if plan.searches:
    own = getattr(plan, "num_beams", None)
    if num_beams != 1 and num_beams != own:
      raise ValueError(f"num_beams={num_beams}: {type(plan).__name__} runs its own search with num_beams={own} "
                       "(set it in the method config); leave generate's num_beams at 1")
    if sampling:
      raise ValueError(f"{type(plan).__name__} runs a deterministic search: do_sample, output_scores and "
                       "output_attention_stats are not available with it")
  elif num_beams != 1:
    plain = (plan.num_views == 1 and not plan.early_exit_layers and type(plan).combine is Plan.combine
             and type(plan).init_state is Plan.init_state)
    if not plain:
      raise ValueError(f"num_beams={num_beams}: beam search runs with methods that only edit attention (AIR, "
                       f"AIR*, AD-HH, head ablations); {type(plan).__name__} adds views or changes the logits")
    if sampling:
      raise ValueError("num_beams > 1 is deterministic beam search: do_sample, output_scores and "
                       "output_attention_stats are not available with it")


def _run_beams(params: LoadedModel, method, ids, mask, pixels, devices, *, num_beams, length_penalty,
               max_new_tokens, b, sampling, early_stopping=False):
  """Beam search (air_jax.beam_search) for methods that only edit attention."""
  from air_jax import beam_search

  if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) or \
      not np.isfinite(length_penalty):
    raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
  if not (isinstance(early_stopping, bool) or early_stopping == "never"):
    raise ValueError(f"early_stopping must be True, False or \"never\" (transformers' values), got "
                     f"{early_stopping!r}")
  plan = method.plan
  check_decoding_options(method, num_beams=num_beams, sampling=sampling)
  config, tok = params.config, params.processor.tokenizer
  mesh = _mesh_for(params, devices)
  p = _place_params(params.params, mesh, config)
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.ndim)), t)
  spec = plan.spec(method.values, ids.shape[0], config)
  out = beam_search.beam_search_jit(p, config, shard(ids), shard(mask), shard(pixels), spec,
                                    num_beams=int(num_beams), max_new_tokens=max_new_tokens,
                                    eos_ids=eos_token_ids(config, tok, params.generation_eos),
                                    pad_id=pad_token_id(tok),
                                    length_penalty=float(length_penalty),
                                    early_stopping=early_stopping)
  return jax.tree.map(np.asarray, out)


def _run_search(params: LoadedModel, method, ids, mask, pixels, devices, *, num_beams, max_new_tokens, sampling):
  """A method's own search (`Plan.searches`): its beam width comes from the method config."""
  plan = method.plan
  check_decoding_options(method, num_beams=num_beams, sampling=sampling)
  config, tok = params.config, params.processor.tokenizer
  mesh = _mesh_for(params, devices)
  p = _place_params(params.params, mesh, config)
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, x.ndim)), t)
  extra = {"processor": params.processor} if getattr(plan, "needs_processor", False) else {}  # e.g. HALC
  out = plan.search(method.values, p, config, shard(ids), shard(mask), shard(pixels), max_new_tokens=max_new_tokens,
                    eos_ids=eos_token_ids(config, tok, params.generation_eos), pad_id=pad_token_id(tok), **extra)
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


def _prepare(params, image, prompt, bucket, devices, protocol=None, shards=None):
  """Images/prompts -> padded numpy inputs (batch padded to a multiple of `shards`, the data axis; default the
  device count) and the real size."""
  images = list(image) if isinstance(image, (list, tuple)) else [image]
  prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
  if len(prompts) != len(images):
    raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
  if not images:
    raise ValueError("no images given")
  _check_prompts(params, images, prompts)
  if family_of(params.config).max_images_per_prompt == 1:  # a list of one image is that image
    images = [im[0] if isinstance(im, (list, tuple)) else im for im in images]
  loaded = [_load_image(im, f"image {k}") for k, im in enumerate(images)]
  if protocol is None:
    ids, mask, pixels = prepare_inputs(params.processor, loaded, prompts, bucket, config=params.config)
  else:
    from air_jax import protocol as protocols

    ids, mask, pixels = protocols.prepare_inputs(params.processor, loaded, prompts, protocol,
                                                 params.config.image_token_id,
                                                 pad_token_id(params.processor.tokenizer), bucket,
                                                 config=params.config)
  b = ids.shape[0]
  extra = (-b) % (len(devices) if shards is None else shards)  # copies of row 0, dropped afterwards
  if extra:
    ids, mask, pixels = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], extra, 0)]), (ids, mask, pixels))
  return ids, mask, pixels, b


def _check_prompts(params, images: list, prompts: list) -> None:
  """Prompts are plain text (generate places the image) and each gets as many images as its family takes."""
  fam = family_of(params.config)
  marker = getattr(params.processor, "image_token", None)
  marker = getattr(marker, "content", marker)  # InstructBLIP's processor holds a tokenizers.AddedToken
  for k, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {k} must be a string, got {type(p).__name__}")
    if marker and marker in p:
      raise ValueError(f"prompt {k} contains the image placeholder {marker!r}: give the text only, generate places "
                       "the image (several images in one prompt: a list of images for that prompt)")
  limit = fam.max_images_per_prompt
  for k, im in enumerate(images):
    if isinstance(im, (list, tuple)) and limit is not None and len(im) > limit:
      raise ValueError(f"image {k} is a list of {len(im)} images for one prompt, but the {fam.name} family takes "
                       f"{limit} image per prompt (Qwen2.5-VL and InternVL take several)")
    if isinstance(im, (list, tuple)) and not im and limit == 1:
      raise ValueError(f"image {k} is an empty list, but the {fam.name} family needs one image per prompt "
                       "(prompts without an image: Qwen2.5-VL and InternVL)")


def _check_filler_rows(method, b: int, rows: int) -> None:
  """Refuses filler rows (a batch padded to split over the data axis) for a method whose rows see each other."""
  if rows != b and method.plan.couples_rows(method.values):
    raise ValueError(f"a batch of {b} does not split evenly over the data axis ({rows} rows after padding), and "
                     f"{type(method.plan).__name__} computes a statistic over the batch (DoLa batch_js, the official "
                     "AD-HH trigger) that filler rows would change; pass a batch whose size is a multiple of the "
                     "data axis (the device count, or the mesh's data size for a sharded model)")


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
def _sweep_jit(params, config, ids, mask, pixels, methods, sv, **kw):
  one = lambda method: decoding.generate_tokens(params, config, ids, mask, pixels, method, sv, **kw)
  return jax.vmap(one)(methods)


def generate_sweep(params: LoadedModel, air_cfgs: Sequence, image, prompt, *, max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int | jax.Array = 0, bucket: int = 64, backend: str | None = None) -> list[Generation]:
  """One compiled, vmapped call for several method configs (a hyperparameter sweep, e.g. 8 values of lambda).

  Every config must compile to one structure (same method, same ops switched on; values may differ). Returns
  one Generation per config, equal to calling `generate` with each config in turn. Methods that bring their own
  search (OPERA, HALC, FarSight's official mode) cannot be vmapped: they run as that loop of `generate` calls.
  """
  from air_jax import methods

  _check_model(params)
  if not air_cfgs:
    raise ValueError("air_cfgs is empty")
  devices = select_devices(backend)
  max_new_tokens = check_max_new_tokens(max_new_tokens)
  if do_sample:
    check_sampling(temperature, top_k, top_p)
  specs = methods.stack_methods([_method_for(c, params.config) for c in air_cfgs])
  if specs.plan.searches:  # the search is a host-driven loop of its own, not the vmappable sampling loop
    return [generate(params, c, image, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, bucket=bucket, backend=backend)
            for c in air_cfgs]
  ids, mask, pixels, b = _prepare(params, image, prompt, bucket, devices, shards=_data_shards(params, devices))
  _check_filler_rows(specs, b, ids.shape[0])
  # Every config runs every view of every example as a row of its own.
  check_lengths(params.config, ids.shape[0] * len(air_cfgs) * specs.plan.num_views, ids.shape[1], max_new_tokens,
                params.dtype.itemsize, devices, real_prompt_len=int(mask.sum(-1).max()))
  out = _run(params, _sweep_jit, specs, ids, mask, pixels, devices, do_sample=do_sample, temperature=temperature,
             top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens, output_scores=False,
             output_stats=False)
  return [_to_generation(params, jax.tree.map(lambda x, i=i: x[i], out), ids, mask, b) for i in range(len(air_cfgs))]


def generate_inputs(params: LoadedModel, image, prompt, bucket: int = 64, protocol=None):
  """The (input_ids, attention_mask, pixel_values) numpy arrays `generate` feeds the model (one device).

  With a protocol, its bucket replaces `bucket` (groups of equal length are not split here).
  """
  if protocol is not None:
    from air_jax.protocol import get_protocol

    protocol = get_protocol(protocol)
    bucket = protocol.bucket
  ids, mask, pixels, _ = _prepare(params, image, prompt, bucket, devices=[None], protocol=protocol)
  return ids, mask, pixels
