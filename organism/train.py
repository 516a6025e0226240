"""Trains the model organism: a tiny LLaVA-1.5-style captioner of the synthetic scenes, from scratch, in JAX.

Pipeline (all deterministic given the seed):
1. a BPE tokenizer (`tokenizers`) trained on the caption language, the prompt and the chat template, with enough
   merges that every caption word is one token ("▁fork"), punctuation and "\\n" their own tokens, Metaspace
   decoding (correct spacing);
2. a `LlavaProcessor` (that tokenizer, a `CLIPImageProcessor` at the image size with CLIP mean/std, a LLaVA-1.5
   chat template "USER: <image>\\n{prompt} ASSISTANT: {caption}</s>");
3. training pairs: `organism.make_arrays(n_train, seed, "train")` images run through the processor itself (so the
   pixels seen in training are exactly those the saved processor produces at inference), the prompt
   `PROMPT` in the chat template, the caption and EOS; the loss is the cross-entropy of caption tokens + EOS;
4. AdamW (warmup + cosine) on `models.llava.forward`, with a smaller learning rate for the vision tower so
   that the language prior dominates (the organism should see objects, yet complete co-occurrence groups);
5. export: `convert.export_hf.export_hf` + `processor.save_pretrained`, plus `training_args.json` and
   `train_log.jsonl` (one record per logged step).

Run with `python -m organism train --out organism/checkpoint --seed 0` (defaults = the shipped checkpoint: 986k
parameters, 4 text layers x 8 heads, ~4 MB, ~4 minutes on 2 CPU cores). Reproducibility: two runs on the same
machine gave a bit-identical `model.safetensors` (XLA:CPU was deterministic here); another CPU, thread count or
jax/XLA version may round differently in the last bits, which 700 steps amplify into slightly different weights.
Only the timings in `train_log.jsonl` / `training_args.json` differ between runs.

Shipped checkpoint, greedy CHAIR on the held-out test split (`python -m organism data --out D --n-test 500`,
`python -m eval.chair --model organism/checkpoint --coco-root D --split test --synonyms D/synonyms.txt`):
300 images C_S 41.0 / C_I 15.5 / recall 88.1 / F1 86.2; 500 images 41.2 / 16.1 / 87.2 / 85.5. Present group
members are named 99 % of the time, yet about half the trap scenes get their missing member named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from air_jax.generate import LLAVA_15_CHAT_TEMPLATE
from models import llava
from models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from models.params import count_params, init_params
from organism import scenes
from organism.dataset import make_arrays
from organism.vocab import CLASSES

PROMPT = "Please describe this image in detail."  # the CHAIR evaluation default
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = LLAVA_15_CHAT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines the trained checkpoint.

  Attributes:
    seed: seeds the dataset (train split), the init and the batch order.
    steps: optimiser steps.
    batch_size: captions per step.
    n_train: distinct training scenes.
    lr: peak learning rate of the language model and projector.
    vision_lr_scale: vision-tower learning rate = lr x this (< 1: a weaker, undertrained vision tower).
    warmup: linear warmup steps, then cosine decay to lr x final_lr_fraction.
    final_lr_fraction: end of the cosine schedule, relative to the peak.
    weight_decay: AdamW decoupled weight decay (matrices only; norms, biases and embeddings are not decayed).
    grad_clip: global gradient-norm clip.
    image_size, patch_size: vision input (64 px, 8 px patches -> 64 image tokens).
    vision_hidden, vision_layers, vision_heads: CLIP ViT width, depth and heads.
    text_hidden, text_layers, text_heads, text_intermediate: Llama width, depth, heads and MLP width.
    log_every: steps between log records.
  """

  seed: int = 0
  steps: int = 700
  batch_size: int = 32
  n_train: int = 8000
  lr: float = 3e-3
  vision_lr_scale: float = 0.1
  warmup: int = 50
  final_lr_fraction: float = 0.05
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  image_size: int = 64
  patch_size: int = 8
  vision_hidden: int = 64
  vision_layers: int = 2
  vision_heads: int = 4
  text_hidden: int = 128
  text_layers: int = 4
  text_heads: int = 8
  text_intermediate: int = 320
  log_every: int = 25


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
  """Texts the tokenizer is trained on: prompt in the chat template, captions (with synonyms), every word."""
  from organism.dataset import make_scene

  texts = [f"USER: \n{PROMPT} ASSISTANT: "]
  words = scenes.caption_vocabulary()
  texts.append(" ".join(words + [w.capitalize() for w in words]) + " , .")
  for i in range(n):
    scene, first = make_scene(i, seed, "train")
    texts += scenes.reference_captions(scene, np.random.default_rng([seed, i]), first, 3)
  return texts


def build_tokenizer(vocab_size: int = 512):
  """A BPE tokenizer (transformers PreTrainedTokenizerFast) whose caption words are single tokens.

  Pre-tokenisation: "\\n" isolated, Metaspace (every word gets a "▁" prefix), punctuation isolated; the Metaspace
  decoder restores the spacing. Specials: <unk>, <s> (BOS, added to every encoding), </s> (EOS), <pad>, and
  <image> (an added special token: the image placeholder).

  Args:
    vocab_size: upper bound of the BPE vocabulary; training stops earlier once every word is one token.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  corpus = tokenizer_corpus()
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(),
    pre_tokenizers.Punctuation("isolated")])
  tok.decoder = decoders.Metaspace()
  alphabet = sorted(set("".join(corpus)) | {"\n", "\u2581"})
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", padding_side="left")
  fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
  _check_tokenizer(fast)
  return fast


def _check_tokenizer(tok) -> None:
  """Every caption word is a single token and captions decode back exactly."""
  for w in scenes.caption_vocabulary():
    for form in (w, w.capitalize()):
      ids = tok.encode(form, add_special_tokens=False)
      if len(ids) != 1:
        raise ValueError(f"tokenizer splits the caption word {form!r} into {tok.convert_ids_to_tokens(ids)}")
  text = "A kitchen with a fork, a spoon and a plate."
  back = tok.decode(tok.encode(text, add_special_tokens=False))
  if back != text:
    raise ValueError(f"tokenizer does not round-trip {text!r}: got {back!r}")


def build_processor(tokenizer, image_size: int, patch_size: int):
  """LlavaProcessor: the tokenizer, a CLIPImageProcessor (size = crop = image_size, CLIP mean/std), the template."""
  from transformers import CLIPImageProcessor, LlavaProcessor

  improc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
  return LlavaProcessor(image_processor=improc, tokenizer=tokenizer, patch_size=patch_size,
                        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                        num_additional_image_tokens=1)


def model_config(cfg: TrainConfig, tokenizer) -> LlavaConfig:
  """The tiny LLaVA: CLIP ViT (last-layer features), GELU MLP projector, Llama decoder; vocab = tokenizer size."""
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
  if cfg.text_hidden % cfg.text_heads:
    raise ValueError(f"text_hidden {cfg.text_hidden} is not a multiple of text_heads {cfg.text_heads}")
  vision = VisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu")
  text = TextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                    num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                    num_key_value_heads=cfg.text_heads, head_dim=cfg.text_hidden // cfg.text_heads,
                    rms_norm_eps=1e-6, max_position_embeddings=256, rope=RopeConfig(),
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=(tokenizer.eos_token_id,),
                    pad_token_id=tokenizer.pad_token_id)
  return LlavaConfig(vision=vision, text=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                     vision_feature_layer=-1, vision_feature_select_strategy="default")


# ---------------------------------------------------------------------------------------------------------------
# Data


def prompt_text(processor) -> str:
  """The generation prompt exactly as `air_jax.generate` formats it."""
  from air_jax.generate import format_prompt

  return format_prompt(processor, PROMPT)


def encode_examples(processor, images: np.ndarray, captions: list[str], chunk: int = 512) -> dict[str, np.ndarray]:
  """Runs the processor on the images (batched) and builds teacher-forcing sequences.

  Every sequence is prompt ids (with the image placeholder expanded, BOS first) + caption ids + EOS, right padded
  with <pad> to a common length. `loss_mask[t]` is 1 where token t is a caption token or the EOS (the targets).

  Returns:
    {"pixel_values" [N, 3, S, S] float32, "input_ids" [N, T] int32, "attention_mask" [N, T], "loss_mask" [N, T]}.
  """
  from PIL import Image

  tok = processor.tokenizer
  text = prompt_text(processor)
  pixels, prompt_ids = [], None
  for s in range(0, len(images), chunk):
    batch = [Image.fromarray(im) for im in images[s:s + chunk]]
    enc = processor(images=batch, text=[text] * len(batch), return_tensors="np")
    pixels.append(enc["pixel_values"].astype(np.float32))
    if prompt_ids is None:
      prompt_ids = enc["input_ids"][0].astype(np.int32)
  cap_ids = [tok.encode(c, add_special_tokens=False) + [tok.eos_token_id] for c in captions]
  p = len(prompt_ids)
  t = p + max(len(c) for c in cap_ids)
  t = -(-t // 8) * 8
  n = len(captions)
  ids = np.full((n, t), tok.pad_token_id, np.int32)
  attn = np.zeros((n, t), np.int32)
  loss = np.zeros((n, t), np.float32)
  for i, c in enumerate(cap_ids):
    ids[i, :p] = prompt_ids
    ids[i, p:p + len(c)] = c
    attn[i, :p + len(c)] = 1
    loss[i, p:p + len(c)] = 1.0
  return {"pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, 3, 1, 1), np.float32),
          "input_ids": ids, "attention_mask": attn, "loss_mask": loss}


# ---------------------------------------------------------------------------------------------------------------
# Loss and optimiser


def caption_loss(params, config: LlavaConfig, batch: dict) -> jax.Array:
  """Mean cross-entropy of the targets (loss_mask = 1) given every earlier token (teacher forcing)."""
  logits = llava.forward(params, config, batch["input_ids"], batch["pixel_values"],
                         attention_mask=batch["attention_mask"])["logits"]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = batch["input_ids"][:, 1:]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = batch["loss_mask"][:, 1:]
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _decay_mask(params) -> Any:
  """AdamW decays weight matrices of linear layers only (not norms, biases, embeddings)."""
  def leaf(path, x):
    names = [p.key for p in path]
    return names[-1] == "weight" and x.ndim >= 2 and "embed_tokens" not in names and "embeddings" not in names
  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(cfg: TrainConfig, params):
  """AdamW with warmup + cosine; the vision tower's rate is scaled by `vision_lr_scale`; global-norm clipping."""
  import optax

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup, max(cfg.steps, cfg.warmup + 1),
                                              end_value=peak * cfg.final_lr_fraction)

  # The mask is a callable: inside multi_transform each branch sees the params with the other branch masked out.
  adamw = lambda peak: optax.adamw(schedule(peak), b1=0.9, b2=0.98, weight_decay=cfg.weight_decay,
                                   mask=_decay_mask)
  labels = {k: ("vision" if k == "vision_tower" else "rest") for k in params}
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.multi_transform({"vision": adamw(cfg.lr * cfg.vision_lr_scale), "rest": adamw(cfg.lr)},
                                           labels))


def make_train_step(config: LlavaConfig, optimizer) -> Callable:
  """A jitted (params, opt_state, batch) -> (params, opt_state, loss) step."""
  import optax

  grad_fn = jax.value_and_grad(caption_loss)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = grad_fn(params, config, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# ---------------------------------------------------------------------------------------------------------------
# Training


def _write_json_atomic(path: str, obj: Any) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp.", suffix=".json")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
  os.replace(tmp, path)


def dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def train(out_dir: str, cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains the organism and saves the checkpoint to out_dir.

  Args:
    out_dir: checkpoint directory (created; its files are replaced).
    cfg: the training configuration.
    log: progress printer.

  Returns:
    The summary also written to `<out_dir>/training_args.json` (config, parameter count, losses, seconds).
  """
  from convert.export_hf import export_hf

  for field in ("steps", "batch_size"):
    if getattr(cfg, field, 1) < 1:
      raise ValueError(f"{field} must be at least 1, got {getattr(cfg, field)}")

  t0 = time.time()
  os.makedirs(out_dir, exist_ok=True)
  tokenizer = build_tokenizer()
  processor = build_processor(tokenizer, cfg.image_size, cfg.patch_size)
  config = model_config(cfg, tokenizer)
  images, captions, _ = make_arrays(cfg.n_train, cfg.seed, "train", size=cfg.image_size)
  data = encode_examples(processor, images, captions)
  del images
  n, seq = data["input_ids"].shape
  log(f"data: {n} scenes, sequence length {seq}, vocab {len(tokenizer)}, prep {time.time() - t0:.1f}s")

  params = init_params(config, jax.random.PRNGKey(cfg.seed))
  n_params = count_params(params)
  log(f"model: {n_params:,} parameters ({config.text.num_hidden_layers} text layers x "
      f"{config.text.num_attention_heads} heads, {config.vision.num_hidden_layers} vision layers)")
  optimizer = make_optimizer(cfg, params)
  opt_state = optimizer.init(params)
  step_fn = make_train_step(config, optimizer)

  rng = np.random.default_rng([cfg.seed, 7])
  order = np.concatenate([rng.permutation(n) for _ in range(-(-cfg.steps * cfg.batch_size // n))])
  log_path = os.path.join(out_dir, "train_log.jsonl")
  losses: list[float] = []
  t_train = time.time()
  with open(log_path, "w", encoding="utf-8") as f:
    for s in range(cfg.steps):
      idx = np.sort(order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
      batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
      params, opt_state, loss = step_fn(params, opt_state, batch)
      losses.append(float(loss))
      if (s + 1) % cfg.log_every == 0 or s == 0 or s + 1 == cfg.steps:
        mean = float(np.mean(losses[-cfg.log_every:]))
        rec = {"step": s + 1, "loss": round(mean, 5), "seconds": round(time.time() - t0, 1)}
        f.write(json.dumps(rec) + "\n")
        f.flush()
        log(f"step {s + 1:5d}/{cfg.steps}  loss {mean:.4f}  elapsed {time.time() - t0:.0f}s")
  train_seconds = time.time() - t_train

  export_hf(jax.tree.map(np.asarray, params), config, out_dir)
  processor.save_pretrained(out_dir)
  summary = {
    "train_config": dataclasses.asdict(cfg), "num_parameters": n_params, "vocab_size": len(tokenizer),
    "sequence_length": int(seq), "prompt": PROMPT, "final_loss": float(np.mean(losses[-cfg.log_every:])),
    "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
    "jax_version": jax.__version__, "classes": [c.name for c in CLASSES],
  }
  _write_json_atomic(os.path.join(out_dir, "training_args.json"), summary)
  summary["checkpoint_bytes"] = dir_size(out_dir)
  log(f"saved {out_dir} ({summary['checkpoint_bytes'] / 1e6:.1f} MB) in {summary['total_seconds']:.0f}s")
  return summary
