"""Builder of a tiny random InstructBLIP (Vicuna-style Llama) checkpoint with its processor: the LLaMA-style BPE
tokenizer of tests.tiny (left padding) and a WordPiece BERT tokenizer for the Q-Former in `qformer_tokenizer/`.

Test-only: imports torch and transformers. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re

from tests.tiny import CORPUS, train_tokenizer


def bert_tokenizer():
  """A BertTokenizerFast over the corpus' lower-cased words and characters (right padding, [CLS] ... [SEP])."""
  from transformers import BertTokenizerFast

  words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
  chars = sorted({c for line in CORPUS for c in line.lower() if not c.isspace()})
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [w for w in words if w not in chars]
  vocab += ["##" + c for c in chars]
  return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def make_tiny_instructblip(path: str, *, num_query_tokens: int = 6, qformer_layers: int = 3, cross_frequency: int = 2,
                           seed: int = 0, save: bool = True):
  """Builds, saves (model + processor) and returns (torch model, processor)."""
  import torch
  from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                            InstructBlipProcessor, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig)

  tokenizer = train_tokenizer()
  qtok = bert_tokenizer()
  image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  vc = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=14)
  qc = InstructBlipQFormerConfig(vocab_size=len(qtok), hidden_size=32, num_hidden_layers=qformer_layers,
                                 num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                                 max_position_embeddings=64, cross_attention_frequency=cross_frequency)
  tc = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
  cfg = InstructBlipConfig(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                           num_query_tokens=num_query_tokens, image_token_index=image_token_id)
  torch.manual_seed(seed)
  model = InstructBlipForConditionalGeneration(cfg)
  with torch.no_grad():  # larger-than-default init so that tiny random models have non-trivial attention
    for name, p in model.named_parameters():
      if "norm" in name.lower() and "weight" in name:
        p.uniform_(0.8, 1.2)
      elif p.ndim >= 2 or "query_tokens" in name or "embedding" in name:
        p.normal_(0.0, 0.1 if "embed" not in name else 0.5)
      else:
        p.normal_(0.0, 0.02)
  model.eval()
  improc = BlipImageProcessor(size={"height": 28, "width": 28})
  processor = InstructBlipProcessor(image_processor=improc, tokenizer=tokenizer, qformer_tokenizer=qtok,
                                    num_query_tokens=num_query_tokens)
  if save:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
  return model, processor
