"""Names -> method configs. Each method file registers its presets at import (see air_jax.methods.__init__)."""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register(name: str, factory: Callable[..., Any], description: str, options: tuple[str, ...] = ()) -> None:
  """Registers `factory(**overrides) -> config` under `name` (one line of `description` for listings).

  options: run-level settings the method consumes when a runner has them (e.g. "heads", the sensitive heads
  of the AIR family); `make(name, run_options=...)` passes only these.
  """
  if name in _REGISTRY:
    raise ValueError(f"decoding method {name!r} is registered twice")
  _REGISTRY[name] = (factory, description)
  _OPTIONS[name] = tuple(options)


def names() -> tuple[str, ...]:
  """Registered method names, in registration order."""
  return tuple(_REGISTRY)


def describe(name: str | None = None):
  """{method name: one-line description} of every registered method, or the description of `name`."""
  if name is None:
    return {k: d for k, (_, d) in _REGISTRY.items()}
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(_REGISTRY)}")
  return _REGISTRY[name][1]


def make(name: str, *, run_options: dict | None = None, **overrides):
  """The config of method `name` (its preset) with field overrides, validated.

  run_options: settings a runner offers every method (e.g. {"heads": path}); those the method registered as
  options are passed, None values and the rest are ignored.

  Raises:
    ValueError: unknown name (the message lists the registered ones) or a bad override.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown decoding method {name!r}; registered methods: {', '.join(_REGISTRY)}")
  kw = {k: v for k, v in (run_options or {}).items() if k in _OPTIONS[name] and v is not None}
  kw.update(overrides)
  try:
    return _REGISTRY[name][0](**kw)
  except TypeError as e:  # an unknown field: say which method and what it accepts
    raise ValueError(f"decoding method {name!r}: {e}") from e
