"""kvcompile: a compiler for the KV cache of decoder LLMs."""

from .cache import CompressedKVCache
from .calibrate import calibrate
from .capture import CaptureError, capture
from .plan import ModelShape, Plan, PlanError
from .recipe import LeanKTraining, Recipe, RecipeError
from .runtime import TransformedModel, transform

__version__ = "0.1.0"

__all__ = [
    "LeanKTraining",
    "Recipe",
    "RecipeError",
    "calibrate",
    "CaptureError",
    "CompressedKVCache",
    "ModelShape",
    "Plan",
    "PlanError",
    "TransformedModel",
    "capture",
    "transform",
]
