"""A Family base for the families whose language decoder is `models.llama` (Llama, Mistral, Qwen2/3 options).

Their decoder params live under `params["language_model"]` and the decoder config under `config.text`; the model
functions that only touch the decoder are the same for all of them (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL,
InternVL-3.5, InstructBLIP), so they live here once. Each family still brings its own config, inputs and vision.
"""

from __future__ import annotations

from models import family as family_lib
from models import llama, llama_parts


class LlamaDecoderFamily(family_lib.Family):
  """`embed_tokens`, `decoder`, `init_cache`, `cache_view`, `logits`, `exit_logits`, `per_layer_params`
  on `models.llama`; `supports_layer_reuse`, `value_norms`, `qk_factors` on `models.llama_parts`."""

  def embed_tokens(self, params, config, ids):
    return llama.embed_tokens(params["language_model"], ids)

  def decoder(self, params, config, embeds, positions, ctx, **kw):
    return llama.decoder(params["language_model"], config.text, embeds, positions, ctx, **kw)

  def init_cache(self, params, config, batch, size, dtype):
    per_layer = isinstance(params["language_model"]["layers"], (list, tuple))
    return llama.init_cache(config.text, batch, size, dtype, per_layer=per_layer)

  def logits(self, params, config, hidden):
    return llama.lm_head(params["language_model"], params.get("lm_head"), hidden)

  def exit_logits(self, params, config, hidden, final_norm: bool):
    return llama.early_exit_logits(params["language_model"], params.get("lm_head"), config.text, hidden, final_norm)

  def supports_layer_reuse(self, config) -> bool:
    # models.llama_parts mirrors models.llama._layer (biases, q/k norms, multimodal RoPE) but has no sliding-window
    # mask, and dynamic RoPE recomputes frequencies from the sequence length (a decoding step differs from a prefill).
    return config.text.sliding_window is None and config.text.rope.rope_type != "dynamic"

  def value_norms(self, params, config, states):
    return llama_parts.value_norms(params["language_model"]["layers"], config.text, states)

  def qk_factors(self, params, config, layer: int, fold_norm: bool = True):
    return llama_parts.qk_factors(params["language_model"]["layers"], config.text, layer, fold_norm)

  def cache_view(self, config, cache):
    if isinstance(cache, dict):  # stacked [L, B, S, K, D]: the default view
      return super().cache_view(config, cache)
    return llama.cache_view(config.text, cache)

  def cache_from_view(self, config, view):
    if isinstance(view, dict):
      return super().cache_from_view(config, view)
    return llama.cache_from_view(config.text, view)

  def per_layer_params(self, params):
    return dict(params, language_model=llama.unstack_layers(params["language_model"]))
