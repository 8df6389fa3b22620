"""kvcompile: a compiler for the KV cache of decoder LLMs."""

from .backend import register as _register_backend
from .cache import CompressedKVCache
from .calibrate import calibrate
from .capture import CaptureError, capture
from .plan import ModelShape, Plan, PlanError
from .recipe import LeanKTraining, Recipe, RecipeError
from .runtime import TransformedModel, transform

__version__ = "0.1.0"

_register_backend()


def export_onnx(model, plan, path, **options):
    """`kvcompile.onnx.export_onnx`: the transformed model as ONNX files onnxruntime runs (needs
    the `onnx` extra: onnx, onnxscript, onnxruntime)."""
    from .onnx import export_onnx as export

    return export(model, plan, path, **options)


def __getattr__(name):
    if name == "onnx":  # imported on first use: onnx, onnxscript and onnxruntime are optional
        import importlib

        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "export_onnx",
    "transform",
]
