"""kvcompile:: operators: reference implementations, and the Triton kernels CUDA calls dispatch to."""

import importlib
import sys

if __name__ != "kvcompile.kernels":
    # Imported as a top-level `kernels` (the repository root on sys.path; transformers probes for a
    # package of that name). Running the modules a second time would define every op again and
    # route calls to copies of the kernels: be kvcompile.kernels instead.
    sys.modules[__name__] = importlib.import_module("kvcompile.kernels")
else:
    from . import cuda_decode, ops  # noqa: F401  (registers torch.ops.kvcompile.* and their CUDA kernels)
