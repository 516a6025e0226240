"""Builders of tiny random LLaVA checkpoints (transformers `save_pretrained`) with a tokenizer trained on the fly.

Test-only: imports torch and transformers. Nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np

from air_jax.generate import LLAVA_15_CHAT_TEMPLATE

CHAT_TEMPLATE = LLAVA_15_CHAT_TEMPLATE
CORPUS = [
    "USER: Please describe this image in detail. ASSISTANT: A cat sits on a red chair next to a dog.",
    "What is in the picture? There are two apples, a cup and a plate on the table.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"-()\n",
]


def train_tokenizer(vocab_size: int = 96):
  """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with <s>, </s>, <pad>, <image> specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  specials = ["<unk>", "<s>", "</s>", "<pad>"]
  alphabet = sorted(set("".join(CORPUS)) | {"\n", "▁"})
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=specials, initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", padding_side="left")
  fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
  fast.add_bos_token = True
  return fast


def make_tiny_llava(
    path: str,
    *,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    image_size: int = 28,
    patch_size: int = 14,
    vision_feature_layer=-2,
    select_strategy: str = "default",
    rope_parameters: dict | None = None,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
    projector_bias: bool = True,
    vision_act: str = "quick_gelu",
    seed: int = 0,
    save: bool = True,
    max_positions: int = 256,
):
  """Builds, saves (model + processor) and returns (torch model, processor) for a tiny random LLaVA."""
  import torch
  from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration, LlavaProcessor)

  tokenizer = train_tokenizer()
  vocab = len(tokenizer)
  image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                        num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                        patch_size=patch_size, projection_dim=16, hidden_act=vision_act)
  tc_kwargs = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=text_layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                   max_position_embeddings=max_positions, attention_bias=attention_bias,
                   tie_word_embeddings=tie_word_embeddings,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
  if rope_parameters is not None:
    tc_kwargs["rope_parameters"] = rope_parameters
  tc = LlamaConfig(**tc_kwargs)
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_id,
                    vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                    multimodal_projector_bias=projector_bias, tie_word_embeddings=tie_word_embeddings,
                    image_seq_length=(image_size // patch_size) ** 2 + (select_strategy == "full"))
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(cfg)
  with torch.no_grad():  # larger-than-default init so that tiny random models have non-trivial attention
    for name, p in model.named_parameters():
      if p.ndim >= 2 and "embed" not in name:
        p.normal_(0.0, 0.1)
      elif p.ndim == 1 and "norm" in name and "weight" in name:
        p.uniform_(0.8, 1.2)
  model.eval()
  improc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
  processor = LlavaProcessor(image_processor=improc, tokenizer=tokenizer, patch_size=patch_size,
                             vision_feature_select_strategy=select_strategy, chat_template=CHAT_TEMPLATE,
                             image_token="<image>", num_additional_image_tokens=1)
  if save:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
  return model, processor


def random_images(n: int, size: int, seed: int = 0):
  from PIL import Image

  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def make_tiny_llava_next(
    path: str,
    *,
    decoder: str = "llama",
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints=None,
    sliding_window: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    save: bool = True,
):
  """A tiny random LLaVA-NeXT (anyres 32 px tiles of 8 px patches) with a Llama or Mistral decoder.

  Returns (torch model, processor); saves both to `path` unless save=False.
  """
  import torch
  from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                            LlavaNextProcessor, MistralConfig)
  from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

  pinpoints = pinpoints or NEXT_PINPOINTS
  tokenizer = train_tokenizer()
  vocab = len(tokenizer)
  image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                        num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                        patch_size=patch_size, projection_dim=16)
  kw = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=text_layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
            max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  if decoder == "mistral":
    tc = MistralConfig(sliding_window=sliding_window, **kw)
  else:
    tc = LlamaConfig(**kw)
  cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=image_token_id,
                        image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                        vision_feature_select_strategy="default", image_seq_length=(image_size // patch_size) ** 2)
  torch.manual_seed(seed)
  model = LlavaNextForConditionalGeneration(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2 and "embed" not in name:
        p.normal_(0.0, 0.1)
      elif p.ndim == 1 and "norm" in name and "weight" in name:
        p.uniform_(0.8, 1.2)
      elif name.endswith("image_newline"):
        p.normal_(0.0, 1.0)
  model.eval()
  improc = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size},
                                      image_grid_pinpoints=pinpoints)
  processor = LlavaNextProcessor(image_processor=improc, tokenizer=tokenizer, patch_size=patch_size,
                                 vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                 image_token="<image>", num_additional_image_tokens=1)
  if save:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
  return model, processor


def random_images_sized(sizes, seed: int = 0):
  """Random RGB images of the given (height, width) sizes."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
