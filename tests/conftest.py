"""Loaded before any test module: without CUDA, Triton must run its interpreter.

Triton decides at import, for every function it decorates (its own `tl.zeros` included), whether
it is interpreted; other test modules import it indirectly (transformers, torch) long before the
kernel tests run, so the switch has to be set here, first.

kvcompile is imported here too, before any test module imports transformers: with the repository
root on sys.path, transformers' probe for a package named `kernels` finds the repository's
`kernels/`, which imports kvcompile, which imports transformers while it is half-initialised.
Collected alone, a test module importing transformers first (test_leank.py) failed that way.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kvcompile  # noqa: E402,F401  (see the docstring: before transformers)
