"""kvcompile: a compiler for the KV cache of decoder LLMs.

`import kvcompile` loads the compiler (plans, capture, passes, kernels, cache, runtime, backend)
and the calibration entry point; evaluation, benchmarks and export are subpackages imported on use.
"""

from .backend import register as _register_backend
from .cache import CompressedKVCache
from .calibration.calibrate import calibrate
from .calibration.heal import heal
from .calibration.recipe import LeanKTraining, Recipe, RecipeError
from .capture import CaptureError, capture
from .plan import ModelShape, Plan, PlanError
from .runtime import TransformedModel, transform
from .static_cache import StaticCompressedCache, cache_for

__version__ = "0.1.0"

_register_backend()


def export_onnx(model, plan, path, **options):
    """`kvcompile.export.onnx.export_onnx`: the transformed model as ONNX files onnxruntime runs
    (needs the `onnx` extra: onnx, onnxscript, onnxruntime)."""
    from .export.onnx import export_onnx as export

    return export(model, plan, path, **options)


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
    "StaticCompressedCache",
    "TransformedModel",
    "cache_for",
    "capture",
    "export_onnx",
    "heal",
    "transform",
]
