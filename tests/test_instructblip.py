"""InstructBLIP vs transformers' InstructBlipForConditionalGeneration (eager): loading, logits, attentions,
segments (query tokens = image, gap in a left-padded mask), greedy tokens over 32 steps, processor quirks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.hf_instructblip import load_params
from models import instructblip, llama
from models.instructblip import config_from_dict
from models.llava import positions_from_mask, prompt_context
from models.segments import IMAGE, PAD, SYSTEM, TEXT, segment_ids
from tests.tiny import random_images
from tests.tiny_instructblip import make_tiny_instructblip

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  import json
  import os

  from transformers import AutoProcessor

  path = str(tmp_path_factory.mktemp("tiny_instructblip"))
  model, _ = make_tiny_instructblip(path)
  model.config._attn_implementation = "eager"
  for sub in (model.vision_model, model.qformer, model.language_model):
    sub.config._attn_implementation = "eager"
  processor = AutoProcessor.from_pretrained(path)
  inputs = processor(images=random_images(2, 28, seed=1), text=PROMPTS, return_tensors="pt", padding=True)
  with open(os.path.join(path, "config.json")) as f:
    config = config_from_dict(json.load(f))
  params = jax.tree.map(jnp.asarray, load_params(path, config))
  return model, processor, inputs, config, params


def run(params, config, inputs, **kw):
  return instructblip.forward(params, config, inputs["input_ids"].numpy(), jnp.asarray(inputs["pixel_values"].numpy()),
                              qformer_input_ids=inputs["qformer_input_ids"].numpy(),
                              qformer_attention_mask=inputs["qformer_attention_mask"].numpy(),
                              attention_mask=inputs["attention_mask"].numpy(), **kw)


def test_processor_quirks(tiny):
  model, processor, inputs, config, _ = tiny
  assert not getattr(processor, "chat_template", None)  # no template: the prompt is used as is
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  q = config.num_query_tokens
  assert (ids[:, :q] == config.image_token_id).all()  # placeholders before BOS ...
  assert (ids[:, q] == config.text.bos_token_id).sum() == 1
  assert mask[1, q] == 0 and mask[1, :q].all()  # ... so the left-padded row has a gap in its mask
  seg = np.asarray(segment_ids(jnp.asarray(ids), jnp.asarray(mask), config.image_token_id))
  assert (seg[:, :q] == IMAGE).all() and not (seg == SYSTEM).any()
  assert (seg[1][mask[1] == 0] == PAD).all() and (seg[1, q:][mask[1, q:] == 1] == TEXT).all()
  # The Q-Former reads its own BERT ids: [CLS] ... [SEP], padded on the side the processor chose.
  qids = inputs["qformer_input_ids"].numpy()
  assert set(qids[:, -1]) == {processor.qformer_tokenizer.sep_token_id}


def test_param_count_and_logits_match_transformers(tiny):
  model, _, inputs, config, params = tiny
  assert sum(int(x.size) for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
  mask = inputs["attention_mask"]
  pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
  with torch.no_grad():
    ref = model(**inputs, position_ids=pos, output_attentions=True)
  out = run(params, config, inputs, output_attentions=True)
  valid = mask.numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(out["logits"])[valid], ref.logits.numpy()[valid], atol=1e-5, rtol=1e-5)
  for layer, ra in enumerate(ref.language_model_outputs.attentions):
    for b in range(2):
      v = valid[b]
      np.testing.assert_allclose(np.asarray(out["attentions"][layer][b])[:, v][:, :, v],
                                 ra[b].numpy()[:, v][:, :, v], atol=1e-5)


def greedy(params, config, inputs, n):
  """Prefill + KV-cached greedy decoding with the Llama decoder (positions and segments from the mask)."""
  ids = jnp.asarray(inputs["input_ids"].numpy())
  mask = jnp.asarray(inputs["attention_mask"].numpy())
  b, t = ids.shape
  size = t + n
  lm = params["language_model"]
  embeds = instructblip.embed_inputs(params, config, ids, jnp.asarray(inputs["pixel_values"].numpy()),
                                     jnp.asarray(inputs["qformer_input_ids"].numpy()),
                                     jnp.asarray(inputs["qformer_attention_mask"].numpy()))
  ctx = prompt_context(ids, mask, config.image_token_id, key_slots=size)
  cache = llama.init_cache(config.text, b, size, jnp.float32)
  h, cache, _ = llama.decoder(lm, config.text, embeds, positions_from_mask(mask), ctx, cache=cache)
  logits = llama.lm_head(lm, params.get("lm_head"), h[:, -1])
  from air_jax.decoding import decode_context

  @jax.jit
  def step(cache, key_seg, tok, pos, slot):
    key_seg = key_seg.at[:, slot].set(TEXT)
    dctx = decode_context(key_seg, slot)
    h, cache, _ = llama.decoder(lm, config.text, llama.embed_tokens(lm, tok), pos, dctx, cache=cache,
                                write_index=slot)
    return llama.lm_head(lm, params.get("lm_head"), h[:, -1]), cache, key_seg

  key_seg, pos, toks = ctx.key_segments, jnp.sum(mask, -1, keepdims=True).astype(jnp.int32), []
  for i in range(n):
    tok = jnp.argmax(logits, -1)
    toks.append(np.asarray(tok))
    logits, cache, key_seg = step(cache, key_seg, tok[:, None], pos + i, jnp.asarray(t + i, jnp.int32))
  return np.stack(toks, 1)


def test_greedy_tokens_match_transformers_generate(tiny):
  model, processor, inputs, config, params = tiny
  n = 32
  with torch.no_grad():
    ref = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
  ref_new = ref[:, inputs["input_ids"].shape[1]:].numpy()
  ours = greedy(params, config, inputs, n)
  assert ref_new.shape == (2, n)
  np.testing.assert_array_equal(ours, ref_new)
  assert len(set(ours[0].tolist())) > 3  # a non-degenerate continuation


def test_bad_checkpoint_names_the_problem(tiny, tmp_path):
  from safetensors.numpy import save_file

  model, _, _, config, _ = tiny
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  sd.pop("query_tokens")
  sd["qformer.extra.weight"] = np.zeros(3, np.float32)
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"(?s)unused checkpoint keys.*qformer.extra.weight.*unfilled.*query_tokens"):
    load_params(str(tmp_path), config)
