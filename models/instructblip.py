"""InstructBLIP (transformers `InstructBlipForConditionalGeneration`, decoder-only language model): BLIP ViT ->
Q-Former with the instruction -> language_projection -> Llama (Vicuna) decoder.

The Q query outputs are the image segment: they replace the Q image placeholder tokens, which the processor puts
before BOS ([<image> x Q][pad...][BOS] prompt in a left-padded batch: a gap in the attention mask, handled by the
mask-based positions and key segments). The Q-Former reads its own instruction ids (`qformer_input_ids`, BERT
tokenizer, right padded) and mask.
Params: {"vision_model": models.blip_vision, "query_tokens": [1, Q, Eq], "qformer": models.qformer,
         "language_projection": {weight, bias}, "language_model": llama params, "lm_head"?: {"weight"}}.
Legend: B batch, I images (= B), Q query tokens, T tokens, E text width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import blip_vision, llama, qformer
from models.blip_vision import BlipVisionConfig
from models.config import _ACTIVATIONS, TextConfig, _check, text_config_from_dict, tied_flag
from models.layers import linear
from models.llava import merge_image_features
from models.qformer import QFormerConfig
from models.spec import RectificationSpec


@dataclasses.dataclass(frozen=True)
class InstructBlipConfig:
  vision: BlipVisionConfig = BlipVisionConfig()
  qformer: QFormerConfig = QFormerConfig()
  text: TextConfig = TextConfig()
  num_query_tokens: int = 32
  image_token_id: int = 32000

  @property
  def num_image_tokens(self) -> int:
    return self.num_query_tokens


def config_from_dict(d: dict) -> InstructBlipConfig:
  mt = d.get("model_type", "instructblip")
  _check(mt == "instructblip", "model_type", mt, "'instructblip'")
  for key in ("vision_config", "qformer_config", "text_config"):
    if key not in d:
      raise ValueError(f"config is missing the field {key!r}")
  v, q = d["vision_config"], d["qformer_config"]
  for field, act in (("vision_config.hidden_act", v.get("hidden_act", "gelu")),
                     ("qformer_config.hidden_act", q.get("hidden_act", "gelu"))):
    _check(act in _ACTIVATIONS, field, act, f"one of {_ACTIVATIONS}")
  tmt = d["text_config"].get("model_type", "llama")
  _check(tmt == "llama", "text_config.model_type", tmt, "'llama' (Vicuna); OPT/T5 InstructBLIP is not supported")
  vision = BlipVisionConfig(
      hidden_size=int(v.get("hidden_size", 1408)), intermediate_size=int(v.get("intermediate_size", 6144)),
      num_hidden_layers=int(v.get("num_hidden_layers", 39)), num_attention_heads=int(v.get("num_attention_heads", 16)),
      image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 14)),
      hidden_act=v.get("hidden_act", "gelu"), layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
      qkv_bias=bool(v.get("qkv_bias", True)))
  qf = QFormerConfig(
      vocab_size=int(q.get("vocab_size", 30522)), hidden_size=int(q.get("hidden_size", 768)),
      num_hidden_layers=int(q.get("num_hidden_layers", 12)), num_attention_heads=int(q.get("num_attention_heads", 12)),
      intermediate_size=int(q.get("intermediate_size", 3072)), hidden_act=q.get("hidden_act", "gelu"),
      max_position_embeddings=int(q.get("max_position_embeddings", 512)),
      layer_norm_eps=float(q.get("layer_norm_eps", 1e-12)),
      cross_attention_frequency=int(q.get("cross_attention_frequency", 2)),
      encoder_hidden_size=int(q.get("encoder_hidden_size", vision.hidden_size)))
  _check(qf.encoder_hidden_size == vision.hidden_size, "qformer_config.encoder_hidden_size", qf.encoder_hidden_size,
         f"the vision width {vision.hidden_size}")
  image_token = d.get("image_token_id", d.get("image_token_index"))
  if image_token is None:
    raise ValueError("config has no image_token_index / image_token_id; InstructBLIP checkpoints saved by "
                     "transformers >= 4.46 carry one (re-save the checkpoint with a current processor)")
  return InstructBlipConfig(vision=vision, qformer=qf,
                            text=text_config_from_dict(dict(d["text_config"], tie_word_embeddings=tied_flag(d))),
                            num_query_tokens=int(d.get("num_query_tokens", 32)), image_token_id=int(image_token))


def image_features(params, config: InstructBlipConfig, pixel_values, qformer_input_ids, qformer_attention_mask):
  """pixel_values [I, C, S, S], one instruction per image [I, Tq] -> projected query features [I, Q, E]."""
  img = blip_vision.forward(params["vision_model"], config.vision, pixel_values)
  if qformer_attention_mask is None:
    qformer_attention_mask = jnp.ones_like(qformer_input_ids)
  q = qformer.forward(params["qformer"], config.qformer, params["query_tokens"], qformer_input_ids,
                      qformer_attention_mask, img)
  return linear(params["language_projection"], q)


def check_image_tokens(config: InstructBlipConfig, input_ids, num_images: int) -> None:
  if isinstance(input_ids, jax.core.Tracer):
    return
  n = int(np.sum(np.asarray(input_ids) == config.image_token_id))
  if n != num_images * config.num_query_tokens:
    raise ValueError(f"input_ids hold {n} image tokens (id {config.image_token_id}) but {num_images} image(s) give "
                     f"{num_images * config.num_query_tokens} query features ({config.num_query_tokens} per image)")


def embed_inputs(params, config: InstructBlipConfig, input_ids, pixel_values, qformer_input_ids=None,
                 qformer_attention_mask=None):
  embeds = llama.embed_tokens(params["language_model"], input_ids)
  if pixel_values is not None:
    if qformer_input_ids is None:
      raise ValueError("InstructBLIP needs qformer_input_ids (the instruction in the Q-Former's BERT vocabulary)")
    feats = image_features(params, config, pixel_values, qformer_input_ids, qformer_attention_mask)
    embeds = merge_image_features(embeds, input_ids, feats, config.image_token_id)
  return embeds


def forward(params, config: InstructBlipConfig, input_ids, pixel_values, *, qformer_input_ids=None,
            qformer_attention_mask=None, attention_mask=None, spec: RectificationSpec | None = None,
            output_attentions: bool = False, position_ids=None) -> dict:
  """Full forward; as models.llava.forward plus the Q-Former's instruction ids and mask. Returns {"logits", ...}."""
  from models import family as family_lib

  vision = None
  if pixel_values is not None:
    vision = {"pixel_values": jnp.asarray(pixel_values), "qformer_input_ids": qformer_input_ids,
              "qformer_attention_mask": qformer_attention_mask}
  return family_lib.forward(params, config, input_ids, vision, attention_mask=attention_mask, spec=spec,
                            output_attentions=output_attentions, position_ids=position_ids)


def param_shapes(config: InstructBlipConfig) -> dict:
  from models.params import param_shapes as llava_shapes
  from models.config import LlavaConfig

  lm = llava_shapes(LlavaConfig(text=config.text))
  tree = {"vision_model": blip_vision.param_shapes(config.vision),
          "query_tokens": (1, config.num_query_tokens, config.qformer.hidden_size),
          "qformer": qformer.param_shapes(config.qformer),
          "language_projection": {"weight": (config.text.hidden_size, config.qformer.hidden_size),
                                  "bias": (config.text.hidden_size,)},
          "language_model": lm["language_model"]}
  if "lm_head" in lm:
    tree["lm_head"] = lm["lm_head"]
  return tree


# ----------------------------------------------------------------------------------------------------------------
# Family interface (models.family).
# ----------------------------------------------------------------------------------------------------------------

InstructBlipConfig.dims = property(lambda self: self.text.dims, doc="The Vicuna decoder's dims.")


def _family():
  from models import chat
  from models import family as family_lib
  from models.llama_family import LlamaDecoderFamily

  class InstructBlipFamily(LlamaDecoderFamily):
    """InstructBLIP (Vicuna): BLIP ViT -> Q-Former with the instruction -> Q query tokens -> Llama decoder.

    Prompts go in as they are: the processor has no chat template and the LLaVA-1.5 fallback is not applied
    (InstructBLIP was tuned on raw instructions). The LM ids are laid out as transformers' processor does:
    [<image> x Q][left padding][BOS] prompt, so a padded row has a gap in its mask. The Q-Former gets the prompt
    in its BERT vocabulary, right padded (LAVIS; BERT positions start at its first token), so a prompt's result
    does not depend on the batch. transformers' 5.x processor pads it on the language tokenizer's side (left, for
    generation) while the Q-Former numbers positions from slot 0: its batched outputs for shorter prompts then differ
    from the same prompt alone (a single prompt, or prompts of equal length, are identical to transformers').
    """

    name = "instructblip"
    model_types = ("instructblip",)
    architectures = ("InstructBlipForConditionalGeneration",)
    config_types = (InstructBlipConfig,)

    def parse_config(self, raw):
      return config_from_dict(raw)

    def param_shapes(self, config):
      return param_shapes(config)

    def canonical_key(self, key):  # its own key table (convert.hf_instructblip), e.g. for head_key_role
      from convert.hf_instructblip import canonical_key

      return canonical_key(key)

    def load_params(self, path, config, dtype, sharding=None):
      from convert.hf_instructblip import load_params
      from convert.tree_fill import place

      return place(load_params(path, config, dtype), sharding)

    def prepare_inputs(self, processor, config, images, prompts, bucket):
      tok, qtok = processor.tokenizer, processor.qformer_tokenizer
      rows = [list(tok(p)["input_ids"]) for p in prompts]
      q, t_len, pad = config.num_query_tokens, max(len(r) for r in rows), chat.pad_token_id(tok)
      ids = np.full((len(rows), q + t_len), pad, np.int32)
      mask = np.zeros_like(ids)
      ids[:, :q], mask[:, :q] = config.image_token_id, 1
      for i, r in enumerate(rows):
        ids[i, q + t_len - len(r):], mask[i, q + t_len - len(r):] = r, 1
      ids, mask = chat.bucket_left(ids, mask, bucket, pad)
      old = qtok.padding_side
      qtok.padding_side = "right"
      try:
        qenc = qtok(list(prompts), padding=True, return_tensors="np")
      finally:
        qtok.padding_side = old
      pixels = processor.image_processor(list(images), return_tensors="np")["pixel_values"]
      return {"input_ids": ids, "attention_mask": mask,
              "vision": {"pixel_values": np.asarray(pixels, np.float32),
                         "qformer_input_ids": np.asarray(qenc["input_ids"], np.int32),
                         "qformer_attention_mask": np.asarray(qenc["attention_mask"], np.int32)}}

    def embed(self, params, config, input_ids, attention_mask, vision):
      if vision is None:
        return llama.embed_tokens(params["language_model"], input_ids)
      check_image_tokens(config, input_ids, vision["pixel_values"].shape[0])
      return embed_inputs(params, config, input_ids, vision["pixel_values"], vision["qformer_input_ids"],
                          vision.get("qformer_attention_mask"))


  return family_lib.register(InstructBlipFamily())


FAMILY = _family()
