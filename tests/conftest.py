"""Loaded before any test module: without CUDA, Triton must run its interpreter.

Triton decides at import, for every function it decorates (its own `tl.zeros` included), whether
it is interpreted; other test modules import it indirectly (transformers, torch) long before the
kernel tests run, so the switch has to be set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
