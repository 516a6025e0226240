"""JAX's persistent compilation cache: compiled graphs are written to a directory and reused by later runs."""

from __future__ import annotations

import os

import jax


def enable_compile_cache(path: str | os.PathLike, min_compile_secs: float = 0.0) -> str:
  """Compiled executables are stored in (and loaded from) `path` from now on, in this process.

  Args:
    path: cache directory (created if missing). Entries are keyed by the graph, the backend and the jax version,
      so one directory serves several models and methods.
    min_compile_secs: graphs that compiled faster than this are not written (jax's default is 1 s; 0 keeps all).

  Returns:
    The absolute path of the cache directory.
  """
  path = os.path.abspath(os.fspath(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compile-cache {path}: cannot create the directory ({e})") from e
  if not os.access(path, os.W_OK):
    raise ValueError(f"--compile-cache {path}: the directory is not writable")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path


def disable_compile_cache() -> None:
  """Back to no persistent cache (the in-memory jit caches stay)."""
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  compilation_cache.reset_cache()
