"""Graph passes over captured explicit-cache programs. Each module holds one pass."""

from .canonicalize import canonicalize_attention
from .manager import PassManager
from .prune_k_channels import prune_k_channels
from .sites import AttentionSite, RoPE, SiteMatchError, find_attention_sites

__all__ = [
    "AttentionSite",
    "PassManager",
    "RoPE",
    "SiteMatchError",
    "canonicalize_attention",
    "find_attention_sites",
    "prune_k_channels",
]
