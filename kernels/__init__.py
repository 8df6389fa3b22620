"""kvcompile:: operators: reference implementations, and the Triton kernels CUDA calls dispatch to."""

# Imported under another name, as a top-level `kernels` (the repository root on sys.path), this
# stays an empty module: transformers probes for the Hub's `kernels` package by importing whatever
# carries that name, and finding no version it counts that package absent. Importing kvcompile
# from here would import transformers while it is half-initialised, and running the op modules a
# second time would define every op again.
if __name__ == "kvcompile.kernels":
    from . import cuda_decode, ops  # noqa: F401  (registers torch.ops.kvcompile.* and their CUDA kernels)
