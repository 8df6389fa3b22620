"""Graph passes over captured explicit-cache programs. Each module holds one pass; `graph` holds
what they share, `manager` runs them. kvcompile/pipeline.py says which run in which order."""

from .cache_site_updates import update_projections_at_cache_sites
from .cache_sites import lower_cache_sites
from .cache_writes_as_outputs import cache_writes_as_outputs
from .cache_encoder import NotEncodable, extract_cache_encoder
from .canonicalize import canonicalize_attention
from .graph import PassError
from .hf_graph_attention import plan_attention_in_hf_graph
from .manager import Pass, PassManager
from .merge_kv_heads import MergeError, merge_kv_heads
from .prefill_mask import attend_with_prefill_mask
from .prune_k_channels import prune_k_channels_decode, prune_k_channels_prefill
from .sites import AttentionSite, RoPE, SiteMatchError, find_attention_sites
from .update_projections import update_projections
from .write_cache_in_place import write_cache_in_place

__all__ = [
    "AttentionSite",
    "MergeError",
    "NotEncodable",
    "Pass",
    "PassError",
    "PassManager",
    "RoPE",
    "SiteMatchError",
    "attend_with_prefill_mask",
    "cache_writes_as_outputs",
    "canonicalize_attention",
    "extract_cache_encoder",
    "find_attention_sites",
    "lower_cache_sites",
    "merge_kv_heads",
    "plan_attention_in_hf_graph",
    "prune_k_channels_decode",
    "prune_k_channels_prefill",
    "update_projections",
    "update_projections_at_cache_sites",
    "write_cache_in_place",
]
