"""Length and memory checks made before anything is allocated: a bad `max_new_tokens` must not reach JAX.

  check_max_new_tokens(n)                         an int >= 1 (2.5, "64", True are refused)
  check_lengths(config, batch, prompt_len, n, dtype)  prompt + n within the model's positions, and the KV cache
                                                  (2 x L x B x (T + N) x K x D x bytes) within device memory
"""

from __future__ import annotations

import os

import numpy as np


def check_max_new_tokens(n) -> int:
  """`n` as an int, or a ValueError naming the value."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
    raise ValueError(f"max_new_tokens must be an int, got {n!r} ({type(n).__name__})")
  if n < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {n}")
  return int(n)


def check_sampling(temperature, top_k, top_p) -> None:
  """The sampling settings transformers' warpers accept, or a ValueError naming the value: temperature > 0,
  top_k an int >= 0 (0 = off), top_p in [0, 1] (1 = off)."""
  num = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)
  if not num(temperature) or temperature <= 0:
    raise ValueError(f"temperature must be a number > 0 when sampling, got {temperature!r} (greedy: do_sample=False)")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
  if not num(top_p) or not 0 <= top_p <= 1:
    raise ValueError(f"top_p must be a number in [0, 1] (1 = no top-p filter), got {top_p!r}")


def _decoder(config):
  """The decoder dims of a model config (any family: `config.dims`), or a decoder config itself."""
  return getattr(config, "dims", None) or getattr(config, "text", config)


def available_memory_bytes(devices=None) -> int | None:
  """Memory of one device (accelerators: its limit; CPU: the host's physical memory), None if unknown."""
  try:
    dev = (devices or [None])[0]
    if dev is None:
      import jax

      dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  except Exception:  # noqa: BLE001 -- memory_stats is backend-specific; fall back to the host's memory
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def kv_cache_bytes(config, batch: int, slots: int, itemsize: int) -> int:
  text = _decoder(config)
  kv = getattr(text, "num_key_value_heads", text.num_attention_heads)
  return 2 * text.num_hidden_layers * batch * slots * kv * text.head_dim * itemsize


def check_lengths(config, batch: int, prompt_len: int, max_new_tokens: int, itemsize: int = 4,
                  devices=None, real_prompt_len: int | None = None) -> None:
  """Raises a ValueError when prompt + generation exceed the model's positions or the cache exceeds memory.

  Positions count real tokens (`real_prompt_len`, the longest prompt without padding; left padding takes no
  position); the cache holds the padded length `prompt_len` + max_new_tokens slots per row.
  """
  text = _decoder(config)
  limit = getattr(text, "max_position_embeddings", None)
  rope = getattr(getattr(config, "text", None), "rope", None) or getattr(text, "rope", None)
  if getattr(rope, "rope_type", None) == "dynamic":
    limit = None  # dynamic NTK scaling exists to run past max_position_embeddings (as transformers does)
  real = prompt_len if real_prompt_len is None else real_prompt_len
  if limit is not None and real + max_new_tokens > limit:
    raise ValueError(f"the prompt ({real} tokens) + max_new_tokens ({max_new_tokens}) = {real + max_new_tokens} "
                     f"exceeds the model's max_position_embeddings ({limit}); shorten the prompt or lower "
                     "max_new_tokens")
  total = prompt_len + max_new_tokens
  need = kv_cache_bytes(config, batch, total, itemsize)
  have = available_memory_bytes(devices)
  if have is not None and need > have:
    raise ValueError(f"the KV cache for batch {batch} x {total} positions needs {need / 2**30:.1f} GiB but the "
                     f"device has {have / 2**30:.1f} GiB; lower the batch size or max_new_tokens")
