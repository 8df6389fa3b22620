"""Analysis: find every attention site of a captured program by walking its graph.

A site is anchored at its attention node (`aten.scaled_dot_product_attention` before
canonicalization, `kvcompile::attention` after) and records the nodes the passes rewrite:

    query            post-RoPE query (B, Hq, S, D), the attention's first input
    key_cat/value_cat  `cat([past, new], -2)`: the cache update; its result is the present K/V
    past_key/past_value  the program inputs holding this layer's cache
    new_key/new_value  this call's post-RoPE key and value (B, Hkv, S, D)
    query_pre_rope/key_pre_rope  the same before RoPE
    q_proj/k_proj/v_proj/o_proj  the linear nodes (one node for a fused qkv projection)
    rope             how RoPE was applied to the key (None for models without rotary embeddings)

Nothing here looks at model class names: an architecture works when its attention lowers to
these ATen ops. A site that cannot be matched raises `SiteMatchError` naming layer and part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from kvcompile.capture import USER_MODEL_PREFIX
from kvcompile.layout import entry_kind, entry_layer
from kvcompile.program import past, placeholder_name, signature_of

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default

# Ops between the cache concat and the attention that only repeat KV heads for GQA
_REPEAT_OPS = {
    aten.unsqueeze.default,
    aten.expand.default,
    aten.reshape.default,
    aten.view.default,
    aten.slice.Tensor,
    aten.clone.default,
    aten.contiguous.default,
}
# Ops that carry a tensor from a projection to the attention without mixing heads or tokens
LAYOUT_OPS = _REPEAT_OPS | {
    aten.transpose.int,
    aten.permute.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.alias.default,
}


class SiteMatchError(RuntimeError):
    """An attention site whose structure kvcompile does not recognise."""

    def __init__(self, layer: int | str, part: str, module_path: str = ""):
        where = f"layer {layer}" + (f" ({module_path})" if module_path else "")
        super().__init__(f"{where}: could not find the {part}")
        self.layer, self.part = layer, part


@dataclass(frozen=True)
class RoPE:
    """`x * cos + rotate(x) * sin` on the first `rotary_dims` channels of each head."""

    layout: str  # "rotate_half": channel i pairs with i + rotary_dims/2; "interleaved": 2i with 2i+1
    rotary_dims: int
    cos: torch.fx.Node
    sin: torch.fx.Node


@dataclass
class AttentionSite:
    layer: int
    module_path: str
    attention: torch.fx.Node
    query: torch.fx.Node
    key_cat: torch.fx.Node
    value_cat: torch.fx.Node
    past_key: torch.fx.Node
    past_value: torch.fx.Node
    new_key: torch.fx.Node
    new_value: torch.fx.Node
    query_pre_rope: torch.fx.Node  # the query/key before RoPE (the same nodes without RoPE)
    key_pre_rope: torch.fx.Node
    q_proj: torch.fx.Node
    k_proj: torch.fx.Node
    v_proj: torch.fx.Node
    o_proj: torch.fx.Node
    rope: RoPE | None
    mask: torch.fx.Node | None
    scale: float
    is_causal: bool


def is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (SDPA, torch.ops.kvcompile.attention.default)


def find_attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every site of the program, one per layer, ordered by layer; raises SiteMatchError."""
    layer_of_past = {
        placeholder_name(past(entry)): entry_layer(entry)
        for entry in signature_of(gm).cache_inputs
        if entry_kind(entry) in ("key", "value")
    }
    sites = [_match_site(node, layer_of_past) for node in gm.graph.nodes if is_attention(node)]
    sites.sort(key=lambda site: site.layer)

    layers = [site.layer for site in sites]
    expected = sorted({layer for layer in layer_of_past.values()})
    for layer in expected:
        if layer not in layers:
            raise SiteMatchError(layer, "attention (no scaled_dot_product_attention reads this layer's cache)")
    if len(set(layers)) != len(layers):
        dup = next(layer for layer in layers if layers.count(layer) > 1)
        raise SiteMatchError(dup, "single attention reading this layer's cache (found several)")
    return sites


def _module_path(node: torch.fx.Node) -> str:
    """The attention module's path in the user's model, e.g. `model.layers.3.self_attn`."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0].removeprefix(USER_MODEL_PREFIX) if stack else ""


def _match_site(attn: torch.fx.Node, layer_of_past: dict[str, int]) -> AttentionSite:
    path = _module_path(attn)
    args = attention_arguments(attn)
    key_cat = walk_back(args["key"], _is_repeat, _is_cache_cat)
    value_cat = walk_back(args["value"], _is_repeat, _is_cache_cat)
    # the cache input a concat reads says which layer this is
    cache_inputs = [cat.args[0][0].target for cat in (key_cat, value_cat) if cat is not None]
    layer = next((layer_of_past[name] for name in cache_inputs if name in layer_of_past), "?")
    if key_cat is None:
        raise SiteMatchError(layer, "key cache concat cat([past_key, new_key], -2) feeding the attention", path)
    if value_cat is None:
        raise SiteMatchError(layer, "value cache concat cat([past_value, new_value], -2) feeding the attention", path)
    past_key, new_key = key_cat.args[0]
    past_value, new_value = value_cat.args[0]
    if layer_of_past.get(past_value.target) != layer:
        raise SiteMatchError(layer, "value cache input of the same layer as its key cache", path)

    query = args["query"]
    q_rope, q_src = _match_rope(query)
    k_rope, k_src = _match_rope(new_key)
    if (q_rope is None) != (k_rope is None):
        raise SiteMatchError(layer, "matching RoPE on both query and key", path)

    q_proj = _projection(q_src)
    k_proj = _projection(k_src)
    v_proj = _projection(new_value)
    o_proj = _output_projection(attn)
    for part, node in (("query projection", q_proj), ("key projection", k_proj), ("value projection", v_proj)):
        if node is None:
            raise SiteMatchError(layer, f"{part} (a linear layer feeding the attention)", path)
    if o_proj is None:
        raise SiteMatchError(layer, "output projection (a linear layer reading the attention output)", path)

    scale = args["scale"]
    if scale is None:
        scale = query.meta["val"].shape[-1] ** -0.5
    if args["dropout_p"]:
        raise SiteMatchError(layer, "attention without dropout (put the model in eval mode)", path)
    return AttentionSite(
        layer=layer,
        module_path=path,
        attention=attn,
        query=query,
        key_cat=key_cat,
        value_cat=value_cat,
        past_key=past_key,
        past_value=past_value,
        new_key=new_key,
        new_value=new_value,
        query_pre_rope=q_src,
        key_pre_rope=k_src,
        q_proj=q_proj,
        k_proj=k_proj,
        v_proj=v_proj,
        o_proj=o_proj,
        rope=k_rope,
        mask=args["attn_mask"],
        scale=float(scale),
        is_causal=bool(args["is_causal"]),
    )


# kvcompile::attention's parameter names -> SDPA's, so both read as one dict
_CANONICAL_NAMES = {"q": "query", "k": "key", "v": "value", "mask": "attn_mask"}


def attention_arguments(node: torch.fx.Node) -> dict:
    """An SDPA or `kvcompile::attention` call's arguments under SDPA's names, defaults filled in."""
    arguments = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if arguments is None:
        raise SiteMatchError("?", f"arguments of {node.format_node()}")
    named = {_CANONICAL_NAMES.get(name, name): value for name, value in arguments.kwargs.items()}
    named.setdefault("dropout_p", 0.0)
    return named


def _is_cache_cat(node: torch.fx.Node) -> bool:
    if node.target != aten.cat.default or len(node.args[0]) != 2:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (-2, 2) and node.args[0][0].op == "placeholder"


def _is_repeat(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _REPEAT_OPS


def walk_back(node, through: Callable[[torch.fx.Node], bool], stop: Callable[[torch.fx.Node], bool]):
    """Follow first inputs back through nodes where `through` holds until `stop(node)`; None if
    another node comes first."""
    while isinstance(node, torch.fx.Node):
        if stop(node):
            return node
        if not through(node):
            return None
        node = node.args[0]
    return None


def _match_rope(node: torch.fx.Node) -> tuple[RoPE | None, torch.fx.Node]:
    """Recognise `x*cos + rotate(x)*sin` (optionally on leading rotary dims, rest passed through).

    Returns (RoPE or None, the pre-RoPE tensor x).
    """
    # partial rotary: cat([rope(x[..., :r]), x[..., r:]], -1)
    if node.target == aten.cat.default and len(node.args[0]) == 2:
        rotated, passed = node.args[0]
        rope, src = _match_rope(rotated)
        # the rotated part is x[..., :r] (an alias when r is the whole head)
        if rope is not None and passed.target == aten.slice.Tensor and src.target in (aten.slice.Tensor, aten.alias.default):
            x = src.args[0]
            if passed.args[0] is x:
                return rope, x
        return None, node
    if node.target != aten.add.Tensor:
        return None, node
    lhs, rhs = node.args
    if not (isinstance(lhs, torch.fx.Node) and isinstance(rhs, torch.fx.Node)):
        return None, node
    if lhs.target != aten.mul.Tensor or rhs.target != aten.mul.Tensor:
        return None, node
    x, cos = lhs.args
    rotated, sin = rhs.args
    layout = _rotation_layout(rotated, x)
    if layout is None:
        # the multiplication may be written the other way round
        x, cos = cos, x
        layout = _rotation_layout(rotated, x)
    if layout is None:
        return None, node
    dims = x.meta["val"].shape[-1]
    return RoPE(layout=layout, rotary_dims=int(dims), cos=cos, sin=sin), x


def _rotation_layout(rotated, x) -> str | None:
    """rotate_half: cat([-x2, x1], -1); interleaved: stack([-x_odd, x_even], -1).flatten(-2)."""
    if not isinstance(rotated, torch.fx.Node):
        return None
    if rotated.target == aten.cat.default and len(rotated.args[0]) == 2:
        neg, first = rotated.args[0]
        if neg.target == aten.neg.default and _is_slice_of(neg.args[0], x) and _is_slice_of(first, x):
            return "rotate_half"
    node = rotated
    while node.target in (aten.flatten.using_ints, aten.reshape.default, aten.view.default):
        node = node.args[0]
    if node.target == aten.stack.default and len(node.args[0]) == 2:
        neg, even = node.args[0]
        if neg.target == aten.neg.default and _is_slice_of(neg.args[0], x) and _is_slice_of(even, x):
            return "interleaved"
    return None


def _is_slice_of(node, x) -> bool:
    return isinstance(node, torch.fx.Node) and node.target == aten.slice.Tensor and node.args[0] is x


def _projection(node: torch.fx.Node) -> torch.fx.Node | None:
    """The linear node a head tensor comes from, through layout ops, norms and slices."""
    for _ in range(32):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return None
        if node.target == LINEAR:
            return node
        node = data_input(node)
    return None


def data_input(node: torch.fx.Node):
    """The activation input of a node: its first input that is not a parameter or constant
    (for a concat, the first tensor concatenated)."""
    for arg in node.args:
        if isinstance(arg, (list, tuple)) and arg:
            arg = arg[0]
        if isinstance(arg, torch.fx.Node) and arg.op != "get_attr":
            return arg
    return None


def _output_projection(attn: torch.fx.Node) -> torch.fx.Node | None:
    node = attn
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            return None
        (node,) = users
        if node.target == LINEAR:
            return node
        if node.target not in LAYOUT_OPS:
            return None
    return None
