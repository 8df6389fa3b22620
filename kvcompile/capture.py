"""Capture: a Hugging Face causal LM as an explicit-cache FX program.

The captured program follows the calling convention of program.py with the model's own cache:

    inputs : input_ids (B, S), position_ids (B, S), past_key.{l} (B, Hkv, P, D) for each layer,
             past_value.{l} (B, Hkv, P, D) for each layer
    outputs: logits (B, S, V), present_key.{l}, present_value.{l}  (B, Hkv, P + S, D)

Batch, sequence and past length are dynamic.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.fx
from torch.export import Dim
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .layout import key_entry, value_entry
from .plan import ModelShape
from .program import (
    LOGITS,
    SHAPE_KEY,
    SIGNATURE_KEY,
    TOKEN_INPUTS,
    Signature,
    clone_program,
    past,
    placeholder_name,
    present,
)

SOURCE_KEY = "kvcompile.source"  # weak reference to the model a program was captured from
# The wrapper holds the user's model as `self.model`: module paths in the graph start with this.
USER_MODEL_PREFIX = "model."


# transformers' name for the cache in a causal LM's forward() arguments and outputs (and generate's
# model kwargs): `past_key_values`, then `cache` from 5.24 on, where the old name is deprecated
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CaptureError(RuntimeError):
    """The model could not be traced into an explicit-cache program."""


class _ExplicitCacheLM(torch.nn.Module):
    """The HF model behind the explicit past/present calling convention."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, past_keys, past_values):
        cache = dynamic_cache_holding(past_keys, past_values)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{CACHE_NAME: cache})
        return out.logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def dynamic_cache_holding(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A transformers DynamicCache whose layers are the given (B, Hkv, T, D) tensors themselves.

    DynamicCache.update would first concatenate them onto an empty tensor: a copy of the whole
    cache, and in a traced program a node that only clutters the graph."""
    cache = DynamicCache()
    for key, value in zip(keys, values):
        layer = DynamicLayer()
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
        cache.layers.append(layer)
    return cache


@contextlib.contextmanager
def _sdpa_attention(model):
    """Trace with SDPA attention (the form analysis matches), restoring the user's choice after."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {key: getattr(cfg, "_attn_implementation", None) for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = "sdpa"
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]


def capture(model: torch.nn.Module, shape: ModelShape | None = None) -> torch.fx.GraphModule:
    """Trace `model` (eval mode, unchanged) into an explicit-cache GraphModule.

    The module's parameters are the user's own tensors, shared, never copied or written.
    """
    shape = shape or ModelShape.from_config(model.config)
    param = next(model.parameters())
    batch, seq, past = 2, 3, 4  # distinct, > 1: export specializes sizes 0 and 1
    input_ids = torch.zeros(batch, seq, dtype=torch.long, device=param.device)
    position_ids = torch.arange(past, past + seq, device=param.device).expand(batch, -1)
    kv = lambda: torch.zeros(batch, shape.num_kv_heads, past, shape.head_dim, dtype=param.dtype, device=param.device)
    past_keys = [kv() for _ in range(shape.num_layers)]
    past_values = [kv() for _ in range(shape.num_layers)]

    b, s, p = Dim("batch"), Dim("seq"), Dim("past")
    cache_dims = [{0: b, 2: p} for _ in range(shape.num_layers)]
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "position_ids": {0: b, 1: s},
        "past_keys": cache_dims,
        "past_values": cache_dims,
    }
    wrapper = _ExplicitCacheLM(model)
    try:
        with _sdpa_attention(model), torch.no_grad():
            exported = torch.export.export(
                wrapper, (input_ids, position_ids, past_keys, past_values), dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as err:  # export failures are long; lead with what the user can act on
        raise CaptureError(
            f"could not capture {type(model).__name__} as an explicit-cache program: {type(err).__name__}: {err}"
        ) from err
    program = _to_plain_graph_module(exported.module(), shape.num_layers)
    program.meta[SOURCE_KEY] = weakref.ref(model)
    program.meta[SHAPE_KEY] = shape
    return program


def program_for(model: torch.nn.Module, program: torch.fx.GraphModule | None, shape: ModelShape) -> torch.fx.GraphModule:
    """A fresh copy of `program` (captured from `model` earlier, to save tracing again) or a new capture."""
    if program is None:
        return capture(model, shape)
    source = program.meta.get(SOURCE_KEY)
    if source is None or source() is not model:
        raise CaptureError("the given program was not captured from this model (use kvcompile.capture(model))")
    return clone_program(program)


def _to_plain_graph_module(module: torch.fx.GraphModule, num_layers: int) -> torch.fx.GraphModule:
    """Drop export's pytree calling convention and input guards: passes change input shapes,
    and the runtime calls the program positionally."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()

    names = list(TOKEN_INPUTS)
    names += [past(key_entry(layer)) for layer in range(num_layers)]
    names += [past(value_entry(layer)) for layer in range(num_layers)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"expected {len(names)} program inputs, traced {len(placeholders)}")
    for node, name in zip(placeholders, names):
        node._rename(placeholder_name(name))
        node.target = node.name

    outputs = [LOGITS]
    outputs += [present(key_entry(layer)) for layer in range(num_layers)]
    outputs += [present(value_entry(layer)) for layer in range(num_layers)]
    gm = torch.fx.GraphModule(module, graph)
    gm.meta[SIGNATURE_KEY] = Signature(inputs=names, outputs=outputs)
    return gm
