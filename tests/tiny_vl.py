"""Tiny random Qwen2.5-VL and InternVL checkpoints (transformers `save_pretrained`) with tokenizers trained on the fly.

Test-only (torch + transformers). The transformers processors of both families need a video processor (torchvision,
absent here), so the reference processors are built with transformers' class-check for the video processor
bypassed (`hf_processor`); checkpoints are saved as tokenizer + image processor + chat template, as users load
them without a video processor.
"""

from __future__ import annotations

import contextlib
import os

from tests.tiny import CORPUS

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(specials, eos: str, pad: str = "<pad>", extra=None, vocab_size: int = 96, padding_side=None):
  """A byte-level BPE fast tokenizer without BOS (as Qwen's), with the given special tokens.

  padding_side None leaves it out of the tokenizer's init kwargs (transformers' default "right" applies)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  alphabet = sorted(set("".join(CORPUS)) | {"\n", "▁"})
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", pad], initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  side = {} if padding_side is None else {"padding_side": padding_side}
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=pad, extra_special_tokens=extra or {},
                                 **side)
  fast.add_special_tokens({"additional_special_tokens": list(specials)})
  fast.eos_token = eos
  return fast


def _init(model, seed):
  import torch

  torch.manual_seed(seed)
  with torch.no_grad():  # larger-than-default init so that tiny random models have non-trivial attention
    for name, p in model.named_parameters():
      if p.ndim >= 2 and "embed" not in name:
        p.normal_(0.0, 0.1)
      elif p.ndim == 1 and "norm" in name and "weight" in name:
        p.uniform_(0.8, 1.2)
      elif p.ndim == 1 and ("bias" in name or "lambda" in name):
        p.normal_(0.0, 0.1)
      elif p.ndim == 3 and "embeddings" in name:  # InternViT position embeddings / cls token
        p.normal_(0.0, 0.1)
  model.eval()
  return model


@contextlib.contextmanager
def _no_video_class_check():
  """transformers' processors validate the video processor's class through a registry that fails without
  torchvision; None is a legitimate value for images-only use, so skip that one check."""
  from transformers import processing_utils

  orig = processing_utils.ProcessorMixin.check_argument_for_proper_class

  def check(self, name, arg):
    if name == "video_processor" and arg is None:
      return None
    return orig(self, name, arg)

  processing_utils.ProcessorMixin.check_argument_for_proper_class = check
  try:
    yield
  finally:
    processing_utils.ProcessorMixin.check_argument_for_proper_class = orig


def make_tiny_qwen2_5_vl(path: str, *, text_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         vision_depth: int = 3, fullatt=(1,), window_size: int = 32, patch_size: int = 8,
                         tie_word_embeddings: bool = False, min_pixels: int = 32 * 32, max_pixels: int = 96 * 96,
                         seed: int = 0, save: bool = True):
  """Builds (and saves) a tiny random Qwen2.5-VL; returns (torch model, transformers processor)."""
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  tok = train_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", padding_side="right")
  ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
  head_dim = hidden // heads
  q = head_dim // 2
  section = [q - 2 * (q // 3), q // 3, q // 3]
  text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok) + 3,
              max_position_embeddings=256, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                            "rope_theta": 10000.0},
              eos_token_id=[ids["<|im_end|>"], tok.pad_token_id], pad_token_id=tok.pad_token_id,
              bos_token_id=None, tie_word_embeddings=tie_word_embeddings)
  vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=patch_size,
                temporal_patch_size=2, spatial_merge_size=2, window_size=window_size, out_hidden_size=hidden,
                fullatt_block_indexes=list(fullatt), hidden_act="silu")
  cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings)
  torch_model = _init(Qwen2_5_VLForConditionalGeneration(cfg), seed)
  improc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    merge_size=2, temporal_patch_size=2)
  with _no_video_class_check():
    processor = Qwen2_5_VLProcessor(image_processor=improc, tokenizer=tok, video_processor=None,
                                    chat_template=QWEN_TEMPLATE)
  if save:
    os.makedirs(path, exist_ok=True)
    torch_model.save_pretrained(path)
    tok.save_pretrained(path)
    improc.save_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(QWEN_TEMPLATE)
  return torch_model, processor


def chat(processor, prompt: str, n_images: int = 1) -> str:
  content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
  return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def random_image(w: int, h: int, seed: int = 0):
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_tiny_internvl(path: str, *, text_type: str = "qwen3", text_layers: int = 2, hidden: int = 64, heads: int = 4,
                       kv_heads: int = 2, vision_layers: int = 3, image_size: int = 32, patch_size: int = 4,
                       norm_type: str = "layer_norm", use_qk_norm: bool = False, use_mean_pooling: bool = True,
                       vision_feature_layer: int = -1, max_patches: int = 4, tie_word_embeddings: bool = False,
                       seed: int = 0, save: bool = True, text_extra: dict | None = None, edit=None):
  """Builds (and saves) a tiny random InternVL; returns (torch model, transformers processor).

  text_extra: more text_config fields (e.g. Qwen3-MoE's experts); edit: called with the initialised torch model
  before it is saved (e.g. to tie two router rows)."""
  import json

  from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"}
  tok = train_tokenizer(INTERNVL_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", extra=extra)
  ctx_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
  text = dict(model_type=text_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok) + 2, head_dim=hidden // heads,
              max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
              bos_token_id=None, tie_word_embeddings=tie_word_embeddings, **(text_extra or {}))
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size, norm_type=norm_type, use_qk_norm=use_qk_norm,
                use_mean_pooling=use_mean_pooling, attention_bias=True, hidden_act="gelu")
  seq = (image_size // patch_size // 2) ** 2
  cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ctx_id, image_seq_length=seq,
                       vision_feature_layer=vision_feature_layer, tie_word_embeddings=tie_word_embeddings)
  torch_model = _init(InternVLForConditionalGeneration(cfg), seed)
  if edit is not None:
    edit(torch_model)
  improc = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                    min_patches=1, max_patches=max_patches)
  with _no_video_class_check():
    processor = InternVLProcessor(image_processor=improc, tokenizer=tok, video_processor=None,
                                  image_seq_length=seq, chat_template=INTERNVL_TEMPLATE)
  if save:
    os.makedirs(path, exist_ok=True)
    torch_model.save_pretrained(path)
    tok.save_pretrained(path)
    improc.save_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(INTERNVL_TEMPLATE)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
      json.dump({"image_seq_length": seq, "processor_class": "InternVLProcessor"}, f)
  return torch_model, processor


def check_transformers_5_processor_layout(src: str, hf_proc, load_processor, image, tmp_path) -> None:
  """A processor directory as transformers 5 saves it (no preprocessor_config.json; one processor_config.json with
  the image processor's settings under "image_processor") loads as the old layout does; preprocessor_config.json
  wins when both are there; neither is a clear error. (`to_json_file` is what save_pretrained writes; it needs a
  video processor itself.)"""
  import json
  import shutil

  import numpy as np
  import pytest

  v5 = str(tmp_path / "v5")
  shutil.copytree(src, v5, ignore=shutil.ignore_patterns("preprocessor_config.json", "processor_config.json",
                                                         "*.safetensors*"))
  hf_proc.to_json_file(os.path.join(v5, "processor_config.json"))
  assert "image_processor" in json.load(open(os.path.join(v5, "processor_config.json")))
  old, new = load_processor(src), load_processor(v5)
  assert new.image_processor.to_dict() == old.image_processor.to_dict()
  text = [chat(hf_proc, "hi")]
  a = old(images=[image], text=text, return_tensors="np")
  b = new(images=[image], text=text, return_tensors="np")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  nested = json.load(open(os.path.join(v5, "processor_config.json")))
  nested["image_processor"]["image_mean"] = [0.1, 0.2, 0.3]
  json.dump(nested, open(os.path.join(v5, "processor_config.json"), "w"))
  assert list(load_processor(v5).image_processor.image_mean) == [0.1, 0.2, 0.3]
  shutil.copy(os.path.join(src, "preprocessor_config.json"), v5)
  assert load_processor(v5).image_processor.to_dict() == old.image_processor.to_dict()
  os.remove(os.path.join(v5, "preprocessor_config.json"))
  os.remove(os.path.join(v5, "processor_config.json"))
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*processor_config.json"):
    load_processor(v5)
