"""kvcompile:: operators (reference implementations; faster lowerings register beside them)."""

from . import ops  # noqa: F401  (registers torch.ops.kvcompile.*)
