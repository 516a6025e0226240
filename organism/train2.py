"""Organism v2: a tiny captioner trained the way LLaVA is built, language model first (issue 18).

Stages (all deterministic given the seed; data from organism.scenes2):
1. vision pre-training: the CLIP-style ViT alone, with a dense objective standing in for CLIP's: every patch
   token predicts the class of the object covering it (or background), the class token the scene type
   (`vision_global_weight` > 0: every patch token also predicts the image's whole object set);
2. text-only language model (the base LLM, also exported as a Hugging Face LlamaForCausalLM directory): the
   chat template with an empty image slot, captions of the "text" split (groups complete ~97 %). Optionally
   (`tag_p` > 0, off by default) the image slot holds a noisy shuffled word list of the scene (each word kept
   with p `tag_keep`), which gives the LM heads that look content words up in the context, as web-text LLMs have
   (measured: a better captioner after alignment alone, but its heads then read the image already and AIR
   does nothing; see the README);
3. projector alignment (vision tower and LM frozen) on image-caption pairs of the "train" split (groups broken
   ~12 %), until the loss plateaus (relative gain over `plateau_window` steps below `plateau_tol`) or
   `align_steps`;
4. a short limited fine-tune: projector + the LM's MLP weights only (attention keeps what the text model
   learned; `ft_train` "mlp_vo" adds the heads' value/output projections, "all" the whole LM), stopped as soon
   as greedy object recall on a dev split (another seed) reaches `target_recall`.

Optional attention budget (`image_budget` < 1, stages 3-4): the loss also penalises a head's attention mass on
image keys above the budget at caption rows (`budget_loss`), to make the LM's heads text-dominated as LLaVA's are;
`budget_from_layer` and `budget_head_fraction` restrict it to some heads (`budget_heads`). `broken_weight` weights
the captions of broken groups in stages 3-4; `modality_drop` hides the text keys from random heads at training steps
(head-level modality dropout, so every head's image read must serve the caption). `init_from` reuses stages 1-2 of an earlier run (same seed and
sizes: the same params; `reuse_vision` false: stage 2 only), so variants of stages 3-4 cost minutes instead of
the whole recipe. `export_dtype` float16 halves the saved files.

  python -m organism train2 --out organism/checkpoint_v2 --seed 0

The defaults are the full recipe (6 layers x 16 heads, hidden 256, 4.47M parameters): 1318 s on the shared 2-core
VM at load 1.7-3 (vision 74 s, text 567 s, alignment 533 s for 300 steps, fine-tune 106 s for 50 steps plus the
dev checks). `organism.measure` prints the issue-18 criteria; the README reports them for this and smaller
variants. Determinism: every stage is seeded (init, batch order, data); `tests/test_organism_v2.py` checks that a
stage run twice gives bit-identical params (XLA:CPU on one machine; another CPU or jax version may round
differently).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, clip, llava, segments
from models.spec import RectificationSpec
from models.config import LlavaConfig
from models.params import count_params, init_params
from organism import scenes2, train as train1
from organism.scenes import _object_layer, render
from organism.quality import caption_objects, malformed_fraction
from organism.vocab import CLASS_BY_NAME, CLASSES, SCENE_TYPES

PROMPT = train1.PROMPT
IMAGE_TOKEN = train1.IMAGE_TOKEN
DEV_SEED_OFFSET = 1000  # the fine-tune's recall check uses test scenes of seed + this (never the eval seed)
FT_TRAIN = ("mlp", "mlp_vo", "all")  # what the fine-tune trains besides the projector (Train2Config.ft_train)


@dataclasses.dataclass(frozen=True)
class Train2Config:
  """Everything that determines the v2 checkpoint (see the module docstring for the stages)."""

  seed: int = 0
  image_size: int = 64
  patch_size: int = 8
  vision_hidden: int = 96
  vision_layers: int = 2
  vision_heads: int = 4
  text_hidden: int = 256
  text_layers: int = 6
  text_heads: int = 16
  text_intermediate: int = 512
  batch_size: int = 32
  # 1. vision
  vision_steps: int = 300
  vision_lr: float = 3e-3
  n_images: int = 6000
  vision_global_weight: float = 0.0  # > 0: patch tokens also learn the image's object set (see vision_loss)
  # 2. text LM
  text_steps: int = 400
  text_lr: float = 2e-3
  n_text: int = 20000
  tag_p: float = 0.0  # fraction of text sequences whose image slot holds a noisy word list
  tag_keep: float = 0.7
  # 3. alignment
  align_steps: int = 300
  align_lr: float = 2e-3
  plateau_window: int = 100
  plateau_tol: float = 0.02
  # 4. fine-tune
  ft_steps: int = 300
  ft_lr: float = 5e-4
  # "mlp": projector + LM MLPs; "mlp_vo": also the attention's value and output projections (where each head
  # attends, set by q/k, stays the text model's); "all": projector + whole LM
  ft_train: str = "mlp"
  target_recall: float = 0.80
  eval_every: int = 50
  # Attention budget (stages 3-4; 1.0 = off): the attention mass a caption row puts on image keys, per layer and
  # head, is penalised above `image_budget` (budget_weight * mean hinge), which keeps the LM's heads text-dominated
  # as LLaVA's are (see `budget_loss`).
  image_budget: float = 1.0
  budget_weight: float = 1.0
  budget_from_layer: int = 0  # the budget binds layers >= this one only (earlier layers read the image freely)
  budget_head_fraction: float = 1.0  # and in each of them this fraction of the heads (seeded draw; budget_heads)
  # Stages 3-4: the caption loss of image-caption pairs whose group is broken (one member missing, ~12 %) is
  # weighted by this factor, so the fine-tune sees more of the evidence that a member can be absent.
  broken_weight: float = 1.0
  # Stages 3-4: weight of `word_gap_loss` (0 = off), which keeps image tokens out of the object words' embedding span.
  word_gap_weight: float = 0.0
  # Stages 3-4: head-level modality dropout (0 = off). At each training step every (example, layer, head) that the
  # budget binds is dropped with this probability: its caption rows then see no text keys, only the system and
  # image keys (`TextKeyDrop`), and the budget does not apply to it. The heads' image reads must then carry what
  # the caption needs (see `drop_mask`).
  modality_drop: float = 0.0
  # Reuse stages 1-2 (vision tower, base LM) of an earlier run with the same seed and sizes: its LLaVA directory
  # (vision tower) and its base_llm/ (the text LM). Empty: train them.
  init_from: str = ""
  reuse_vision: bool = True  # with init_from: False reuses only the base LM and trains stage 1 again
  export_dtype: str = "float32"  # of both saved models; "float16" halves the checkpoint (the shipped one)
  n_dev: int = 64
  warmup: int = 30
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  log_every: int = 25


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, processor, config


def build_tokenizer2(vocab_size: int = 512):
  """BPE tokenizer (as v1's) trained on the v2 caption language: every caption word is one token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  words = scenes2.caption2_vocabulary()
  corpus = [f"USER: \n{PROMPT} ASSISTANT: ", " ".join(words + [w.capitalize() for w in words]) + " , ."]
  corpus += [scenes2.caption2(s) for s in scenes2.scenes2(1500, 0, "text")]
  corpus += [" ".join(words)] * 20  # every word frequent enough to be merged whole
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
  tok.decoder = decoders.Metaspace()
  alphabet = sorted(set("".join(corpus)) | {"\n", "\u2581"})
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(train1.SPECIAL_TOKENS),
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", bos)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", padding_side="left")
  fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
  for w in words:
    for form in (w, w.capitalize()):
      if len(fast.encode(form, add_special_tokens=False)) != 1:
        raise ValueError(f"v2 tokenizer splits the caption word {form!r}")
  text = scenes2.caption2(scenes2.scenes2(1, 0, "test")[0])
  if fast.decode(fast.encode(text, add_special_tokens=False)) != text:
    raise ValueError(f"v2 tokenizer does not round-trip {text!r}")
  return fast


def model_config2(cfg: Train2Config, tokenizer) -> LlavaConfig:
  base = train1.TrainConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, vision_hidden=cfg.vision_hidden,
                            vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads,
                            text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, text_heads=cfg.text_heads,
                            text_intermediate=cfg.text_intermediate)
  return train1.model_config(base, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Data


def patch_labels(scene, size: int, patch: int) -> np.ndarray:
  """[P] int: per patch (row-major), 1 + class index of the object covering >= 30 % of it, else 0."""
  n = size // patch
  cover = np.zeros((len(CLASSES) + 1, size, size), np.float32)
  for obj in scene.objects:
    y0, x0, alpha, _ = _object_layer(obj, size)
    h, w = alpha.shape
    cover[CLASS_BY_NAME[obj.name].id, y0:y0 + h, x0:x0 + w] += alpha
  per = cover.reshape(-1, n, patch, n, patch).mean(axis=(2, 4)).reshape(len(CLASSES) + 1, -1)
  lab = per.argmax(0)
  return np.where(per.max(0) >= 0.3, lab, 0).astype(np.int32)


def image_data(processor, scenes, size: int, patch: int, captions: bool = True) -> dict[str, np.ndarray]:
  """Pixels (through the processor), caption sequences, patch labels and scene ids of scenes."""
  images = np.stack([render(s, size) for s in scenes])
  caps = [scenes2.caption2(s) for s in scenes]
  data = train1.encode_examples(processor, images, caps)
  data["patch_labels"] = np.stack([patch_labels(s, size, patch) for s in scenes])
  data["scene_ids"] = np.array([[st.name for st in SCENE_TYPES].index(s.scene_type) for s in scenes], np.int32)
  data["presence"] = np.array([[c.name in s.names for c in CLASSES] for s in scenes], np.float32)
  return data


def text_data(tokenizer, scenes, seed: int, tag_p: float, tag_keep: float) -> dict[str, np.ndarray]:
  """Text-only sequences: the chat template with the image slot empty or holding a noisy word list."""
  rng = np.random.default_rng([seed, 11])
  template = f"USER: {IMAGE_TOKEN}\n{PROMPT} ASSISTANT:"
  seqs, starts = [], []
  for s in scenes:
    tags = scenes2.tag_context(s, rng, tag_keep) if rng.random() < tag_p else ""
    prompt = tokenizer.encode(template.replace(IMAGE_TOKEN, tags), add_special_tokens=True)
    cap = tokenizer.encode(scenes2.caption2(s), add_special_tokens=False) + [tokenizer.eos_token_id]
    seqs.append(prompt + cap)
    starts.append(len(prompt))
  t = -(-max(len(x) for x in seqs) // 8) * 8
  ids = np.full((len(seqs), t), tokenizer.pad_token_id, np.int32)
  attn = np.zeros_like(ids)
  loss = np.zeros(ids.shape, np.float32)
  for i, (x, p) in enumerate(zip(seqs, starts)):
    ids[i, :len(x)] = x
    attn[i, :len(x)] = 1
    loss[i, p:len(x)] = 1.0
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


# ---------------------------------------------------------------------------------------------------------------
# Losses


def _xent(logits, ids, w):
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  w = w[:, 1:]
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@flax.struct.dataclass
class TextKeyDrop:
  """Method-style attention op (site `edit_masked`, see models.attention): in the dropped heads of each example,
  text query rows see no text keys (their logits set to the mask value), only system and image keys.

  drop [L, B, H] float 0/1 (the layer axis is sliced away by the model before the op runs).
  """

  drop: jax.Array

  def edit_masked(self, scores, ctx):  # scores [B, H, T, S]
    rows = ctx.query_segments == segments.TEXT  # [B, T]
    keys = ctx.key_segments == segments.TEXT  # [B, S]
    hit = (self.drop[:, :, None, None] > 0) & rows[:, None, :, None] & keys[:, None, None, :]
    return jnp.where(hit, attention.NEG, scores)


def _drop_spec(config, drop):
  """The RectificationSpec that applies TextKeyDrop(drop [L, B, H]); None when drop is None."""
  if drop is None:
    return None
  layers, _, heads = drop.shape
  return RectificationSpec(head_gate=jnp.ones((layers, heads), jnp.float32), extra=(TextKeyDrop(drop),))


def drop_mask(cfg: Train2Config, step, batch_size: int) -> jax.Array:
  """[L, B, H] float 0/1: the (layer, example, head) triples modality dropout drops at this training step.

  Bernoulli(cfg.modality_drop) on the heads the budget binds (`budget_heads`), from a key of (seed, step): the
  draw is reproducible and differs between steps.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 7919), step)
  shape = (cfg.text_layers, batch_size, cfg.text_heads)
  hit = jax.random.bernoulli(key, cfg.modality_drop, shape).astype(jnp.float32)
  return hit * jnp.asarray(budget_heads(cfg))[:, None, :]


def lm_loss(params, config, batch, drop=None):
  """Caption / text cross-entropy; drop [L, B, H] optionally applies modality dropout (`TextKeyDrop`)."""
  logits = llava.forward(params, config, batch["input_ids"], batch.get("pixel_values"),
                         attention_mask=batch["attention_mask"], spec=_drop_spec(config, drop))["logits"]
  return _xent(logits, batch["input_ids"], batch["loss_mask"])


def image_mass(attentions, input_ids, loss_mask, image_token_id: int):
  """Attention mass of caption rows on image keys: ([L, B, H, T] mass, [B, T] rows that predict a caption token).

  attentions [L, B, H, T, T]; a row t predicts token t + 1, so caption rows are those with loss_mask[:, t + 1].
  """
  image = (input_ids == image_token_id).astype(attentions.dtype)  # [B, T] image keys
  mass = jnp.einsum("lbhts,bs->lbht", attentions, image)
  rows = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
  return mass, rows


def budget_heads(cfg: Train2Config) -> np.ndarray:
  """[L, H] float 0/1: the heads the attention budget binds (layers >= budget_from_layer; in each, the fraction
  budget_head_fraction of its heads, drawn by the seed)."""
  mask = np.zeros((cfg.text_layers, cfg.text_heads), np.float32)
  rng = np.random.default_rng([cfg.seed, 17])
  k = int(round(cfg.budget_head_fraction * cfg.text_heads))
  for layer in range(cfg.text_layers):
    chosen = rng.permutation(cfg.text_heads)[:k]  # drawn for every layer, so the choice per layer is stable
    if layer >= cfg.budget_from_layer:
      mask[layer, chosen] = 1.0
  return mask


def budget_loss(params, config, batch, budget: float, weight: float, heads=None, drop=None):
  """lm_loss + weight * mean over the bound heads (all, or the [L, H] 0/1 mask `heads`) and caption rows of
  max(0, image mass - budget). drop [L, B, H]: modality dropout as in lm_loss; dropped heads are not bound.

  The hinge leaves heads under the budget alone, so the model still learns to read the image, but no bound head
  may spend more than `budget` of a caption row's attention on the image: text dominates it, as in LLaVA, where
  the hallucination-sensitive heads' text/image mass ratio (MAI) is about 5 (the insensitive ones' about 1.5).
  """
  out = llava.forward(params, config, batch["input_ids"], batch.get("pixel_values"),
                      attention_mask=batch["attention_mask"], output_attentions=True, spec=_drop_spec(config, drop))
  xent = _xent(out["logits"], batch["input_ids"], batch["loss_mask"])
  mass, rows = image_mass(out["attentions"], batch["input_ids"], batch["loss_mask"], config.image_token_id)
  heads = jnp.ones(mass.shape[::2], mass.dtype) if heads is None else jnp.asarray(heads, mass.dtype)  # [L, H]
  bound = heads[:, None, :] * (1.0 if drop is None else 1.0 - drop)  # [L, B, H]
  rows = (rows > 0).astype(mass.dtype)  # loss weights (broken_weight) do not weight the budget
  over = jnp.maximum(mass - budget, 0.0) * rows[None, :, None, :] * bound[..., None]
  n = jnp.maximum(jnp.sum(rows), 1.0) * jnp.maximum(jnp.sum(heads), 1.0)
  return xent + weight * jnp.sum(over) / n


def modality_drop_loss(params, config, batch, base_loss, cfg: Train2Config):
  """base_loss (lm_loss or a budget_loss partial) with modality dropout drawn for batch["step"] (`drop_mask`)."""
  drop = drop_mask(cfg, batch["step"], batch["input_ids"].shape[0])
  return base_loss(params, config, batch, drop=drop)


def word_gap_loss(params, config, batch, base_loss, weight: float, word_ids, drop=None):
  """base_loss + weight * mean over image tokens of the share of their squared norm that lies in the span of the
  LM's input embeddings of the object words (`word_ids`; the span is not trained through this term).

  Keeps the projected image tokens out of the directions object words occupy, so heads that key on object words
  in the text (the co-occurrence prior) do not read image tokens as those words.
  """
  loss = base_loss(params, config, batch, drop=drop)  # lm_loss and budget_loss take drop=None as "no dropout"
  emb = jax.lax.stop_gradient(params["language_model"]["embed_tokens"]["weight"][jnp.asarray(word_ids)])  # [W, E]
  basis, _ = jnp.linalg.qr(emb.T)  # [E, W] orthonormal
  x = llava.image_features(params, config, batch["pixel_values"])  # [B, P, E]
  share = jnp.sum((x @ basis) ** 2, -1) / jnp.maximum(jnp.sum(x * x, -1), 1e-12)
  return loss + weight * jnp.mean(share)


def vision_loss(params, config, batch, global_weight: float = 0.0):
  """Per-patch class cross-entropy + scene-type cross-entropy from the class token (last layer).

  global_weight > 0 adds that times the mean over patches of a multi-label (sigmoid) cross-entropy of every patch
  token predicting which classes the whole image holds (batch["presence"] [B, C]): every token then carries the
  image's object set, absences included, as CLIP's patch tokens carry global content.
  """
  vc = config.vision
  h = clip.forward(params["vision_tower"], vc, batch["pixel_values"])[-1]  # [B, 1+P, Ev]
  patch_logits = h[:, 1:] @ params["head"]["patch_w"] + params["head"]["patch_b"]
  scene_logits = h[:, 0] @ params["head"]["scene_w"] + params["head"]["scene_b"]
  lp = jax.nn.log_softmax(patch_logits, -1)
  l1 = -jnp.mean(jnp.take_along_axis(lp, batch["patch_labels"][..., None], -1))
  ls = jax.nn.log_softmax(scene_logits, -1)
  l2 = -jnp.mean(jnp.take_along_axis(ls, batch["scene_ids"][:, None], -1))
  if not global_weight:
    return l1 + l2
  z = h[:, 1:] @ params["head"]["global_w"] + params["head"]["global_b"]  # [B, P, C]
  y = batch["presence"][:, None, :]
  l3 = jnp.mean(jnp.logaddexp(0.0, z) - y * z)
  return l1 + l2 + global_weight * l3


def _trainable(params, stage: str, ft_train: str = "mlp"):
  """Bool pytree: which leaves a stage trains."""
  def leaf(path, _):
    top = path[0].key
    names = [getattr(p, "key", "") for p in path]
    if stage == "vision":
      return top in ("vision_tower", "head")
    if stage == "text":
      return top in ("language_model", "lm_head")
    if stage == "align":
      return top == "multi_modal_projector"
    if stage == "ft":
      if top == "multi_modal_projector":
        return True
      if ft_train == "all":
        return top in ("language_model", "lm_head")
      if ft_train == "mlp_vo":
        return top == "language_model" and ("mlp" in names or "v_proj" in names or "o_proj" in names)
      if ft_train != "mlp":
        raise ValueError(f"ft_train must be one of {FT_TRAIN}, got {ft_train!r}")
      return top == "language_model" and "mlp" in names
    raise ValueError(stage)
  return jax.tree_util.tree_map_with_path(leaf, params)


def _fit(params, loss_fn, config, trainable, data, steps, lr, cfg: Train2Config, seed_stream: int, log, name,
         warmup=None, stop: Callable[[int, list[float], Any], bool] | None = None, log_file=None):
  """AdamW (warmup + cosine) on the trainable leaves only; frozen leaves keep their exact values."""
  import optax

  warmup = cfg.warmup if warmup is None else warmup
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)
  decay = jax.tree_util.tree_map_with_path(
      lambda p, x: p[-1].key == "weight" and x.ndim >= 2 and "embed_tokens" not in [getattr(q, "key", "") for q in p],
      params)
  opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                    optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay, mask=decay))
  train_p = jax.tree.map(lambda x, t: x if t else None, params, trainable)
  frozen_p = jax.tree.map(lambda x, t: None if t else x, params, trainable)
  merge = lambda tp, fp: jax.tree.map(lambda a, b: b if a is None else a, tp, fp, is_leaf=lambda x: x is None)
  state = opt.init(train_p)

  @jax.jit
  def step(tp, fp, st, batch):
    loss, g = jax.value_and_grad(lambda t: loss_fn(merge(t, fp), config, batch))(tp)
    up, st = opt.update(g, st, tp)
    return optax.apply_updates(tp, up), st, loss

  n = len(next(iter(data.values())))
  rng = np.random.default_rng([cfg.seed, seed_stream])
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * cfg.batch_size // n))])
  losses: list[float] = []
  t0 = time.time()
  done = 0
  for s in range(steps):
    idx = np.sort(order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
    batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    batch["step"] = jnp.asarray(s, jnp.int32)  # traced: per-step randomness (modality_drop) without a retrace
    train_p, state, loss = step(train_p, frozen_p, state, batch)
    losses.append(float(loss))
    done = s + 1
    if done % cfg.log_every == 0 or s == 0 or done == steps:
      mean = float(np.mean(losses[-cfg.log_every:]))
      log(f"{name} step {done:5d}/{steps}  loss {mean:.4f}  {time.time() - t0:.0f}s")
      if log_file is not None:
        log_file.write(json.dumps({"stage": name, "step": done, "loss": round(mean, 5),
                                   "seconds": round(time.time() - t0, 1)}) + "\n")
        log_file.flush()
    if stop is not None and stop(done, losses, merge(train_p, frozen_p)):
      break
  return merge(train_p, frozen_p), {"steps": done, "final_loss": float(np.mean(losses[-cfg.log_every:])),
                                    "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Greedy recall on a dev split (the fine-tune's stopping rule)


def object_metrics(scenes, texts) -> dict[str, float]:
  """CHAIR-style C_S, C_I, recall, precision (unique objects per caption) and the malformed fraction."""
  hal = mentioned = correct = gt = hal_caps = 0
  for s, t in zip(scenes, texts):
    objs = set(caption_objects(t))
    h = objs - set(s.names)
    hal += len(h)
    mentioned += len(objs)
    correct += len(objs & set(s.names))
    gt += len(s.names)
    hal_caps += bool(h)
  n = max(len(texts), 1)
  return {"CHAIRs": hal_caps / n, "CHAIRi": hal / max(mentioned, 1), "Recall": correct / max(gt, 1),
          "Precision": correct / max(mentioned, 1), "malformed": malformed_fraction(texts)}


def _loaded(params, config, processor):
  from air_jax.loading import LoadedModel

  return LoadedModel(params=jax.tree.map(jnp.asarray, params), config=config, processor=processor)


def dev_recall(params, config, processor, dev_scenes, images, max_new_tokens: int = 80) -> dict[str, float]:
  import air_jax

  model = _loaded(params, config, processor)
  texts = []
  for s in range(0, len(images), 48):
    texts += air_jax.generate(model, None, list(images[s:s + 48]), PROMPT, max_new_tokens=max_new_tokens).texts
  return object_metrics(dev_scenes, texts)


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_base_llm(params, config: LlavaConfig, tokenizer, out_dir: str, dtype=np.float32) -> None:
  """The text LM as a Hugging Face LlamaForCausalLM directory (config.json, model.safetensors, tokenizer)."""
  from convert.export_hf import checkpoint_tensors, config_dict
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  tensors = checkpoint_tensors(params, config)
  out = {}
  for k, v in tensors.items():
    if k.startswith("language_model.model."):
      out["model." + k[len("language_model.model."):]] = np.ascontiguousarray(v.astype(dtype))
    elif k.startswith("language_model.lm_head."):
      out["lm_head." + k[len("language_model.lm_head."):]] = np.ascontiguousarray(v.astype(dtype))
  st_path = os.path.join(out_dir, "model.safetensors")
  save_file(out, st_path, metadata={"format": "pt"})
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(st_path, 0o666 & ~mask)  # save_file creates 0600
  text = dict(config_dict(config)["text_config"])
  text.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": np.dtype(dtype).name})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(text, f, indent=2, sort_keys=True)
    f.write("\n")
  tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def reuse_stages(params, config: LlavaConfig, run_dir: str, vision: bool = True):
  """params with the vision tower of `run_dir` (an earlier train2 output) and its base LM (`run_dir/base_llm`).

  vision=False keeps params' own vision tower (stage 1 is then trained again) and checks only the text sizes.

  Stages 1-2 do not depend on anything that stages 3-4 change, so a run with the same seed and stage 1-2 settings
  gives the same params as training them again (float32 files); the stage records name the reused run and its
  settings. Raises ValueError when the sizes differ.
  """
  import air_jax
  from air_jax.analysis.base_llm import load_base_llm

  for d in (run_dir, os.path.join(run_dir, "base_llm")):
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
      saved = json.load(f).get("dtype", "float32")
    if saved != "float32":  # rounded weights would not give the params of training stages 1-2 again
      raise ValueError(f"init_from {run_dir}: {d}/config.json has dtype {saved!r}; reuse a run exported with "
                       f"export_dtype float32, or leave init_from empty.")
  prev = air_jax.load_pretrained(run_dir, with_processor=False)
  llm = load_base_llm(os.path.join(run_dir, "base_llm"))
  for name, got, want in (("vision", prev.config.vision, config.vision), ("text", llm.config.text, config.text)):
    if got != want and (vision or name == "text"):
      raise ValueError(f"init_from {run_dir}: its {name} config differs from this run's; train with the same "
                       f"sizes or leave init_from empty.\n  theirs: {got}\n  ours:   {want}")
  out = dict(params)
  if vision:
    out["vision_tower"] = jax.tree.map(np.asarray, prev.params["vision_tower"])
  out["language_model"] = jax.tree.map(np.asarray, llm.params["language_model"])
  if "lm_head" in params:
    out["lm_head"] = jax.tree.map(np.asarray, llm.params["lm_head"])
  shapes = jax.tree.map(np.shape, params)
  if jax.tree.map(np.shape, out) != shapes:
    raise ValueError(f"init_from {run_dir}: its parameters do not have this run's shapes")
  # This run's stage 1-2 settings (steps, data sizes, seed) were not used: record the reused run's.
  reused = {"reused_from": os.path.abspath(run_dir)}
  args_file = os.path.join(run_dir, "training_args.json")
  if os.path.isfile(args_file):
    with open(args_file, encoding="utf-8") as f:
      theirs = json.load(f)
    reused["train_config"] = theirs.get("train_config")
  return out, dict(reused), dict(reused)


def train2(out_dir: str, cfg: Train2Config = Train2Config(), log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the four stages and writes the LLaVA directory to out_dir and the base LM to out_dir/base_llm."""
  from convert.export_hf import EXPORT_DTYPES, export_hf

  if cfg.ft_train not in FT_TRAIN:
    raise ValueError(f"ft_train must be one of {FT_TRAIN}, got {cfg.ft_train!r}")
  if not 0.0 <= cfg.image_budget <= 1.0 or cfg.budget_weight < 0:
    raise ValueError(f"image_budget must be in [0, 1] and budget_weight >= 0, got {cfg.image_budget}, "
                     f"{cfg.budget_weight}")
  if not 0 <= cfg.budget_from_layer < cfg.text_layers:
    raise ValueError(f"budget_from_layer must be in [0, text_layers={cfg.text_layers}), got {cfg.budget_from_layer}")
  if not 0.0 <= cfg.modality_drop < 1.0:
    raise ValueError(f"modality_drop must be in [0, 1), got {cfg.modality_drop}")
  if not 0.0 < cfg.budget_head_fraction <= 1.0:
    raise ValueError(f"budget_head_fraction must be in (0, 1], got {cfg.budget_head_fraction}")
  if cfg.export_dtype not in EXPORT_DTYPES:
    raise ValueError(f"export_dtype must be one of {EXPORT_DTYPES}, got {cfg.export_dtype!r}")
  if cfg.word_gap_weight < 0:
    raise ValueError(f"word_gap_weight must be >= 0, got {cfg.word_gap_weight}")
  if cfg.broken_weight <= 0:
    raise ValueError(f"broken_weight must be > 0, got {cfg.broken_weight}")
  t0 = time.time()
  os.makedirs(out_dir, exist_ok=True)
  tokenizer = build_tokenizer2()
  processor = train1.build_processor(tokenizer, cfg.image_size, cfg.patch_size)
  config = model_config2(cfg, tokenizer)
  train_scenes = scenes2.scenes2(cfg.n_images, cfg.seed, "train")
  img = image_data(processor, train_scenes, cfg.image_size, cfg.patch_size)
  txt, text_info = None, "no text sequences (stage 2 reused)"
  if not cfg.init_from:  # the text corpus only feeds stage 2
    txt = text_data(tokenizer, scenes2.scenes2(cfg.n_text, cfg.seed, "text"), cfg.seed, cfg.tag_p, cfg.tag_keep)
    text_info = f"{len(txt['input_ids'])} text sequences (length {txt['input_ids'].shape[1]})"
  dev_scenes = scenes2.scenes2(cfg.n_dev, cfg.seed + DEV_SEED_OFFSET, "test")
  dev_images = np.stack([render(s, cfg.image_size) for s in dev_scenes])
  log(f"data: {len(train_scenes)} image-caption pairs (length {img['input_ids'].shape[1]}), {text_info}, "
      f"vocab {len(tokenizer)}, prep {time.time() - t0:.0f}s")

  key = jax.random.PRNGKey(cfg.seed)
  params = init_params(config, key)
  k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
  ev = cfg.vision_hidden
  params["head"] = {"patch_w": 0.02 * jax.random.normal(k1, (ev, len(CLASSES) + 1)),
                    "patch_b": jnp.zeros(len(CLASSES) + 1),
                    "scene_w": 0.02 * jax.random.normal(k2, (ev, len(SCENE_TYPES))),
                    "scene_b": jnp.zeros(len(SCENE_TYPES))}
  if cfg.vision_global_weight:  # its own key: runs without it keep their params
    k3 = jax.random.fold_in(key, 2)
    params["head"].update(global_w=0.02 * jax.random.normal(k3, (ev, len(CLASSES))), global_b=jnp.zeros(len(CLASSES)))
  n_params = count_params({k: v for k, v in params.items() if k != "head"})
  log(f"model: {n_params:,} parameters ({cfg.text_layers} layers x {cfg.text_heads} heads, hidden {cfg.text_hidden})")
  stages: dict[str, Any] = {}
  if cfg.init_from:  # before the log file is opened: a mismatch fails without leaving one behind
    head = params.pop("head")
    params, vision_record, stages["text"] = reuse_stages(params, config, cfg.init_from, vision=cfg.reuse_vision)
    if cfg.reuse_vision:
      stages["vision"] = vision_record
    else:  # stage 1 runs below; it does not read the LM, so the result equals a full run's
      params["head"] = head
    log(f"{'stages 1-2' if cfg.reuse_vision else 'stage 2'} reused from {cfg.init_from}")
  f = open(os.path.join(out_dir, "train_log.jsonl"), "w", encoding="utf-8")

  if "vision" not in stages:
    vis = {k: img[k] for k in ("pixel_values", "patch_labels", "scene_ids", "presence")}
    vloss = functools.partial(vision_loss, global_weight=cfg.vision_global_weight)
    params, stages["vision"] = _fit(params, vloss, config, _trainable(params, "vision"), vis,
                                    cfg.vision_steps, cfg.vision_lr, cfg, 1, log, "vision", log_file=f)
    params.pop("head")
  if "text" not in stages:
    params, stages["text"] = _fit(params, lm_loss, config, _trainable(params, "text"), txt, cfg.text_steps,
                                  cfg.text_lr, cfg, 2, log, "text", log_file=f)
  base_params = jax.tree.map(np.asarray, params)
  cap_loss = lm_loss
  if cfg.image_budget < 1.0:
    cap_loss = functools.partial(budget_loss, budget=cfg.image_budget, weight=cfg.budget_weight,
                                 heads=budget_heads(cfg))
  if cfg.word_gap_weight:
    words = [tokenizer.convert_tokens_to_ids("\u2581" + c.name) for c in CLASSES]
    cap_loss = functools.partial(word_gap_loss, base_loss=cap_loss, weight=cfg.word_gap_weight, word_ids=words)
  if cfg.modality_drop:
    cap_loss = functools.partial(modality_drop_loss, base_loss=cap_loss, cfg=cfg)

  cap = {k: img[k] for k in ("pixel_values", "input_ids", "attention_mask", "loss_mask")}
  broken = np.array([bool(s.expected_absent) for s in train_scenes])
  cap["loss_mask"] = cap["loss_mask"] * np.where(broken, cfg.broken_weight, 1.0).astype(np.float32)[:, None]

  def plateau(done, losses, _):
    w = cfg.plateau_window
    if done < 2 * w or done % cfg.log_every:
      return False
    prev, cur = np.mean(losses[-2 * w:-w]), np.mean(losses[-w:])
    return (prev - cur) / prev < cfg.plateau_tol

  params, stages["align"] = _fit(params, cap_loss, config, _trainable(params, "align"), cap, cfg.align_steps,
                                 cfg.align_lr, cfg, 3, log, "align", stop=plateau, log_file=f)
  m = dev_recall(params, config, processor, dev_scenes, dev_images)
  log(f"after alignment: dev {json.dumps({k: round(v, 3) for k, v in m.items()})}")
  stages["align"]["dev"] = m
  evals = []

  def reached(done, _, p):
    if done % cfg.eval_every:
      return False
    r = dev_recall(p, config, processor, dev_scenes, dev_images)
    evals.append({"step": done, **r})
    log(f"ft step {done}: dev {json.dumps({k: round(v, 3) for k, v in r.items()})}")
    return r["Recall"] >= cfg.target_recall

  if m["Recall"] < cfg.target_recall:
    params, stages["ft"] = _fit(params, cap_loss, config, _trainable(params, "ft", cfg.ft_train), cap, cfg.ft_steps,
                                cfg.ft_lr, cfg, 4, log, "ft", warmup=10, stop=reached, log_file=f)
    stages["ft"]["dev"] = evals
  f.close()
  train_seconds = time.time() - t0

  params = jax.tree.map(np.asarray, params)
  export_hf(params, config, out_dir, dtype=cfg.export_dtype)
  processor.save_pretrained(out_dir)
  export_base_llm(base_params, config, tokenizer, os.path.join(out_dir, "base_llm"), dtype=np.dtype(cfg.export_dtype))
  summary = {"train_config": dataclasses.asdict(cfg), "num_parameters": n_params, "vocab_size": len(tokenizer),
             "prompt": PROMPT, "stages": stages, "train_seconds": round(train_seconds, 1),
             "total_seconds": round(time.time() - t0, 1), "jax_version": jax.__version__,
             "classes": [c.name for c in CLASSES], "load_average": os.getloadavg()}
  train1._write_json_atomic(os.path.join(out_dir, "training_args.json"), summary)
  summary["checkpoint_bytes"] = train1.dir_size(out_dir)
  log(f"saved {out_dir} ({summary['checkpoint_bytes'] / 1e6:.1f} MB) in {summary['total_seconds']:.0f}s")
  return summary
