"""foundation: pretraining multi-task vision and vision-language foundation models.

Importing the package registers our own backbones (CeiT, ...) with timm's registry, so
``timm.create_model("ceit_tiny_patch16_224")`` works after ``import foundation``.
"""

from foundation import models  # noqa: F401  (registers backbones with timm)

__version__ = "0.1.0"
