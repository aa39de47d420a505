"""Backbones. Each of our own models is one file registered with timm's ``register_model``."""

from foundation.models import ceit  # noqa: F401  (registers ceit_* with timm)
from foundation.models import intern  # noqa: F401  (registers intern_generalist with timm)
