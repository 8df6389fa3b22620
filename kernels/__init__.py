"""kvcompile:: operators: reference implementations, and the Triton kernels CUDA calls dispatch to."""

# Imported as a top-level `kernels` (the repository root on sys.path: `python -m ...` or a script run
# from a checkout), this module stands aside: that name is the Hub's kernels package, which
# transformers imports when it is installed (a dependency of transformers from 5.25 on). It loads
# that package in its own place; where none is installed it stays an empty module, which
# transformers counts as absent (it has no version). Importing kvcompile from here instead would
# import transformers half-way through its own import, and define every op a second time.
if __name__ == "kvcompile.kernels":
    from . import cuda_decode, ops  # noqa: F401  (registers torch.ops.kvcompile.* and their CUDA kernels)
elif __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _installed = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _installed is not None:  # the import system returns what sys.modules holds once this module has run
        _package = importlib.util.module_from_spec(_installed)
        sys.modules[__name__] = _package
        _installed.loader.exec_module(_package)
