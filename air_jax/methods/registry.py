"""Names -> method configs. Each method file registers its presets at import (see air_jax.methods.__init__)."""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}


def register(name: str, factory: Callable[..., Any], description: str) -> None:
  """Registers `factory(**overrides) -> config` under `name` (one line of `description` for listings)."""
  if name in _REGISTRY:
    raise ValueError(f"decoding method {name!r} is registered twice")
  _REGISTRY[name] = (factory, description)


def names() -> tuple[str, ...]:
  """Registered method names, in registration order."""
  return tuple(_REGISTRY)


def describe() -> dict[str, str]:
  return {k: d for k, (_, d) in _REGISTRY.items()}


def make(name: str, **overrides):
  """The config of method `name` (its preset) with field overrides, validated.

  Raises:
    ValueError: unknown name (the message lists the registered ones) or a bad override.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown decoding method {name!r}; registered methods: {', '.join(_REGISTRY)}")
  return _REGISTRY[name][0](**overrides)
