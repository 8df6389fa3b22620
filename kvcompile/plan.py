"""The plan: what kvcompile keeps of each layer's KV cache.

A plan is data. Its readable part (counts, model fingerprint, provenance) is JSON; its index
tensors live in a safetensors file beside it. Loading never unpickles.

K-channel part (LeanK): for each planned layer, for each KV head, the sorted ids of the post-RoPE
key channels that are kept. Counts may differ between heads; a head may keep none. Layers absent
from the plan keep every channel.

Windows (LeanK's full-channel sink and recent tokens): with `sink` or `recent` > 0, the first
`sink` and the last `recent` tokens of every planned layer keep all K channels, and the tokens in
between (the *middle*) keep the planned channels. A head keeping no channel is then a *streaming
head*: it holds no middle K or V and attends to the window only. Tokens move from the window to the
middle `buffer` at a time: after a call that leaves T tokens, the middle holds tokens
[sink, sink + M), M = max(0, (T - sink - recent) // buffer * buffer) (`middle_length`).
Without windows (sink = recent = 0, the default) every token is "middle": all keep the planned
channels, and a head keeping none scores 0 on every key, i.e. attends uniformly.

Sliding-window layers (Mistral, Gemma-2/3, Qwen2 with `use_sliding_window`, Cohere2, ...): a
layer whose queries attend only the last `window` tokens (themselves included) holds only the last
`window - 1` tokens between calls (`ModelShape.sliding_windows`), at its planned channels; LeanK's
sink/recent windows apply to global layers only, so a windowed plan cannot plan a sliding layer.

Merge part (KV-head merging): for each merged layer, groups of t KV heads, each becoming one KV
head of s·d channels (s sub-heads of the original width d; s = 1 is plain GQA with fewer heads),
through `down`/`up` maps (see bases.py). Merging comes first: a layer's K channels then index its
merged heads.

Update part (healing, calibration/heal.py): for some layers, low-rank updates of the attention's
query, key, value and output projections, in the model's own head order: the layer computes with
W + b @ a in place of the model's W, before any merge folds or prunes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .stores import read_json, read_tensors, tensors_bytes, write_atomically, write_json

FORMAT = "kvcompile.plan"
FORMAT_VERSION = 2  # 2: plan.json records the plan's fingerprint and its tensors file's SHA-256
_READABLE_VERSIONS = (1, 2)
DEFAULT_BUFFER = 128  # LeanK's accumulation buffer: window tokens move to the middle 128 at a time
_JSON_NAME = "plan.json"
_TENSORS_NAME = "tensors.safetensors"
_MERGE_TENSORS = ("key_down", "key_up", "value_down", "value_up")
PROJECTIONS = ("query", "key", "value", "output")
_BUILTIN = Path(__file__).parent / "plans"  # package data: plans/<model>/<plan>/


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that a plan depends on; checked before any rewrite. `model_type` is
    None where it is unknown (a graph dynamo captured shows the shape, not the model).
    `sliding_windows`: per layer, the tokens a query attends (itself included) of a sliding-window
    layer, None for a layer attending every token; None where unknown (all layers global)."""

    model_type: str | None
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    sliding_windows: tuple[int | None, ...] | None = None

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = decoder_config(config)
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            model_type=text.model_type,
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            num_heads=num_heads,
            head_dim=head_dim,
            sliding_windows=attention_windows(text),
        )

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for a layer attending every token."""
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    @property
    def slides(self) -> bool:
        """Whether any layer attends a sliding window."""
        return any(window is not None for window in self.sliding_windows or ())


_SLIDING, _FULL = "sliding_attention", "full_attention"


def attention_windows(config) -> tuple[int | None, ...] | None:
    """Each layer's sliding window as transformers' caches read it: from `layer_types` where the
    config has them (Gemma, Qwen2, Cohere2, ...), else one `sliding_window` for every layer
    (Mistral, Phi-3); None when no layer slides. Other layer types (chunked attention, ...) are
    refused by name: their caches keep other tokens."""
    window = getattr(config, "sliding_window", None)
    default = _SLIDING if window is not None else _FULL
    types = getattr(config, "layer_types", None) or [default] * config.num_hidden_layers
    windows = []
    for layer, kind in enumerate(types):
        if kind not in (_SLIDING, _FULL):
            raise PlanError(f"layer {layer}: config field layer_types says {kind!r}; kvcompile compiles "
                            f"{_FULL!r} and {_SLIDING!r} layers")
        if kind == _SLIDING and not (isinstance(window, int) and window >= 1):
            raise PlanError(f"layer {layer}: a {_SLIDING!r} layer needs config field sliding_window >= 1, got {window!r}")
        windows.append(window if kind == _SLIDING else None)
    return tuple(windows) if any(w is not None for w in windows) else None


def decoder_config(config):
    """The config of the decoder's text stack (multimodal configs nest it), else `config` itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


ROPE_MODES = ("commute", "post", "none")


@dataclass(frozen=True, eq=False)
class LayerMerge:
    """Each group of KV heads `groups[g]` becomes one KV head of `heads_per_group * d` channels.

    key_down/value_down (G, t·d, s·d) and key_up/value_up (G, s·d, t·d) follow bases.py:
    c = k_group @ down, k_group ≈ c @ up. `rope` says how keys meet RoPE: "commute" (maps commute
    with it, folded into the weights), "post" (applied to post-RoPE keys and queries at run time),
    "none" (the model has no rotary embedding; folded like values).
    """

    groups: tuple[tuple[int, ...], ...]
    heads_per_group: int
    rope: str
    key_down: torch.Tensor
    key_up: torch.Tensor
    value_down: torch.Tensor
    value_up: torch.Tensor
    method: str = "svd"

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    def merged_head_dim(self, head_dim: int) -> int:
        return self.heads_per_group * head_dim

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("key_down", "key_up", "value_down", "value_up")}

    def validate(self, layer: int, shape: "ModelShape") -> None:
        where = f"layer {layer}, field merges"
        heads = sorted(h for group in self.groups for h in group)
        if heads != list(range(shape.num_kv_heads)):
            raise PlanError(f"{where}: groups {list(self.groups)} must cover KV heads 0..{shape.num_kv_heads - 1} once each")
        t, s = self.group_size, self.heads_per_group
        if any(len(group) != t for group in self.groups):
            raise PlanError(f"{where}: groups must all have the same size, got {[len(g) for g in self.groups]}")
        if not 1 <= s < t:
            raise PlanError(f"{where}: a group of {t} heads must become 1..{t - 1} heads, got {s}")
        if self.rope not in ROPE_MODES:
            raise PlanError(f"{where}: rope must be one of {ROPE_MODES}, got {self.rope!r}")
        d, n = shape.head_dim, len(self.groups)
        expected = {"down": (n, t * d, s * d), "up": (n, s * d, t * d)}
        for name, tensor in self.tensors().items():
            want = expected[name.split("_")[1]]
            if tuple(tensor.shape) != want:
                raise PlanError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {want}")


@dataclass(frozen=True, eq=False)
class LayerUpdate:
    """Low-rank updates of one layer's attention projections: `factors[name] = (b, a)` for some of
    PROJECTIONS, and the layer's `name` projection weight W (out, in) computes as W + b @ a,
    b (out, r) and a (r, in). query: out = heads·d; key, value: out = KV heads·d; output: in =
    heads·d; the other side is the model's hidden size (checked against the weights by the pass)."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    def delta(self, name: str) -> torch.Tensor:
        """b @ a in float32 at least (factors stored in bf16 still update float32 weights in float32)."""
        b, a = self.factors[name]
        dtype = torch.promote_types(b.dtype, torch.float32)
        return b.to(dtype) @ a.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Each factor by `name.b`/`name.a`, names sorted (the order the fingerprint hashes them in)."""
        return {f"{name}.{side}": tensor for name in sorted(self.factors) for side, tensor in zip("ba", self.factors[name])}

    def validate(self, layer: int, shape: "ModelShape") -> None:
        where = f"layer {layer}, field updates"
        if not self.factors or set(self.factors) - set(PROJECTIONS):
            raise PlanError(f"{where}: expected updates of some of {PROJECTIONS}, got {sorted(self.factors)}")
        heads = {"query": shape.num_heads, "key": shape.num_kv_heads, "value": shape.num_kv_heads,
                 "output": shape.num_heads}
        for name, (b, a) in self.factors.items():
            if not (isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor)):
                raise PlanError(f"{where}: {name} factors must be a pair of tensors (b, a)")
            if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                raise PlanError(f"{where}: {name} factors b {tuple(b.shape)} and a {tuple(a.shape)} are not "
                                "(out, r) and (r, in)")
            head_side = heads[name] * shape.head_dim
            side, size = ("a", a.shape[1]) if name == "output" else ("b", b.shape[0])
            if size != head_side:
                raise PlanError(f"{where}: {name}.{side} spans {size} head channels, the model has {heads[name]} "
                                f"heads of {shape.head_dim} ({head_side})")


@dataclass(frozen=True)
class Plan:
    """Per-layer compression decisions and the sink/recent windows that keep all channels.
    Build with `from_k_channels` (then `with_merges`, `with_windows`), or load a saved one."""

    k_channels: Mapping[int, tuple[tuple[int, ...], ...]]
    model: ModelShape | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    merges: Mapping[int, LayerMerge] = field(default_factory=dict)
    updates: Mapping[int, LayerUpdate] = field(default_factory=dict)
    sink: int = 0
    recent: int = 0
    buffer: int = DEFAULT_BUFFER
    # a learned plan's per-(layer, KV head, channel) scale factors (L, H, D): what its kept
    # channels were cut from, kept for inspection (`kvcompile importance`); not applied
    importance: torch.Tensor | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        """One line: what a plan does, not its thousands of channel ids (`k_channels` has those)."""
        parts = [self.fingerprint()]
        if self.k_channels:
            kept = sum(len(ids) for heads in self.k_channels.values() for ids in heads)
            heads = sum(len(heads) for heads in self.k_channels.values())
            parts.append(f"k_channels: {len(self.k_channels)} layers, {heads} KV heads, {kept} channels kept")
        if self.merges:
            parts.append(f"merges: {len(self.merges)} layers")
        if self.updates:
            parts.append(f"updates: {len(self.updates)} layers")
        if self.windowed:
            parts.append(f"sink={self.sink}, recent={self.recent}, buffer={self.buffer}")
        if "method" in self.meta:
            parts.append(f"method={self.meta['method']!r}")
        return f"Plan({', '.join(parts)})"

    def __post_init__(self):
        # checked here so that every way of building a plan (constructor, replace, load) is covered
        for name, least in (("sink", 0), ("recent", 0), ("buffer", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise PlanError(f"field {name}: expected {kind} int, got {value!r}")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_k_channels(
        cls,
        channels: Mapping[int, Sequence[Sequence[int]]],
        *,
        model: ModelShape | None = None,
        meta: Mapping[str, Any] | None = None,
        sink: int = 0,
        recent: int = 0,
        buffer: int = DEFAULT_BUFFER,
        importance: torch.Tensor | None = None,
    ) -> "Plan":
        """`{layer: [[kept channel ids of KV head 0], [... head 1], ...]}`, with optional windows
        (`sink`, `recent`, `buffer`: see the module docstring).

        Checks what can be checked without a model (types, sorted, unique, non-negative);
        `validate` checks the rest against a model.
        """
        parsed: dict[int, tuple[tuple[int, ...], ...]] = {}
        for layer, heads in channels.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise PlanError(f"plan layer key {layer!r}: layer indices must be ints")
            if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
                raise PlanError(f"layer {layer}: expected a list of per-KV-head channel lists")
            parsed[layer] = tuple(_parse_head(layer, h, ids) for h, ids in enumerate(heads))
        return cls(dict(sorted(parsed.items())), model, dict(meta or {}), sink=sink, recent=recent, buffer=buffer,
                   importance=importance)

    def with_merges(self, merges: Mapping[int, LayerMerge]) -> "Plan":
        """This plan with KV-head merges for some layers (its K channels then index merged heads)."""
        return replace(self, merges=_joined_layers(self.merges, merges, "merges", LayerMerge))

    def with_updates(self, updates: Mapping[int, LayerUpdate]) -> "Plan":
        """This plan with low-rank updates of some layers' attention projections (healing)."""
        return replace(self, updates=_joined_layers(self.updates, updates, "updates", LayerUpdate))

    def with_float_dtype(self, dtype: torch.dtype) -> "Plan":
        """This plan with its merge maps and projection updates stored in `dtype` (e.g. bfloat16, to
        ship a healed plan at half the bytes): a different plan, with its own fingerprint."""
        merges = {layer: replace(merge, **{name: t.to(dtype) for name, t in merge.tensors().items()})
                  for layer, merge in self.merges.items()}
        updates = {layer: LayerUpdate({name: tuple(t.to(dtype) for t in pair) for name, pair in update.factors.items()})
                   for layer, update in self.updates.items()}
        return replace(self, merges=merges, updates=updates)

    def with_windows(self, sink: int, recent: int, buffer: int | None = None) -> "Plan":
        """This plan keeping all channels of the first `sink` and last `recent` tokens; `buffer`
        (default: this plan's) is how many tokens move to the middle at a time."""
        return replace(self, sink=sink, recent=recent, buffer=self.buffer if buffer is None else buffer)

    # -- queries ------------------------------------------------------------------------------

    @property
    def windowed(self) -> bool:
        """Whether planned layers keep full-channel sink/recent windows (and streaming heads)."""
        return self.sink > 0 or self.recent > 0

    def middle_length(self, length: int) -> int:
        """How many of `length` tokens a planned layer holds in its pruned middle region: all of
        them without windows, else the tokens the move rule has moved out of the window."""
        if not self.windowed:
            return length
        return max(0, (length - self.sink - self.recent) // self.buffer * self.buffer)

    def kept_counts(self, layer: int) -> tuple[int, ...]:
        return tuple(len(ids) for ids in self.k_channels[layer])

    def middle_value_heads(self, layer: int) -> tuple[int, ...]:
        """The KV heads of a planned, windowed layer whose middle V is kept: those keeping at least
        one K channel (the others are streaming heads), ascending."""
        return tuple(head for head, count in enumerate(self.kept_counts(layer)) if count)

    def kv_heads(self, layer: int, shape: ModelShape) -> tuple[int, int]:
        """(KV heads, channels per head) of `layer` once its merge, if any, is applied."""
        merge = self.merges.get(layer)
        if merge is None:
            return shape.num_kv_heads, shape.head_dim
        return len(merge.groups), merge.merged_head_dim(shape.head_dim)

    def token_elements(self, layer: int, shape: ModelShape) -> tuple[int, int]:
        """(K, V) elements one token of `layer` holds at its planned widths (a middle token of a
        windowed plan: streaming heads hold no V)."""
        full = math.prod(self.kv_heads(layer, shape))
        if layer not in self.k_channels:
            return full, full
        values = len(self.middle_value_heads(layer)) * self.kv_heads(layer, shape)[1] if self.windowed else full
        return sum(self.kept_counts(layer)), values

    def held_tokens(self, layer: int, shape: ModelShape, length: int) -> tuple[int, int]:
        """(tokens at the planned widths, tokens with every channel) `layer` holds after `length`
        tokens: a sliding layer the last `window - 1` (all a later query can see), a windowed
        layer its middle and its window, any other layer all of them."""
        window = shape.window(layer)
        if window is not None:
            return min(length, window - 1), 0
        if self.windowed and layer in self.k_channels:
            middle = self.middle_length(length)
            return middle, length - middle
        return length, 0

    def k_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        """Bytes of K one middle token occupies in the cache, summed over layers (batch 1).

        Without windows that is every token (of the layers that hold it: a sliding layer holds
        its window's); with windows, window tokens cost `window_bytes_per_token` instead."""
        return sum(self.token_elements(layer, shape)[0] for layer in range(shape.num_layers)) * _itemsize(dtype)

    def v_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        """Bytes of V one middle token occupies (streaming heads of windowed plans hold none)."""
        return sum(self.token_elements(layer, shape)[1] for layer in range(shape.num_layers)) * _itemsize(dtype)

    def window_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        """Bytes of K and V one token occupies while it has all channels (a window token): every
        layer's (possibly merged) heads in full."""
        return 2 * sum(math.prod(self.kv_heads(layer, shape)) for layer in range(shape.num_layers)) * _itemsize(dtype)

    def cache_nbytes(self, shape: ModelShape, dtype: torch.dtype, batch: int, length: int) -> int:
        """Bytes of K and V the compressed cache holds for `batch` sequences of `length` tokens."""
        return sum(self.kv_nbytes(shape, dtype, batch, length))

    def kv_nbytes(self, shape: ModelShape, dtype: torch.dtype, batch: int, length: int) -> tuple[int, int]:
        """(K bytes, V bytes) of the compressed cache for `batch` sequences of `length` tokens: per
        layer, its `held_tokens` at its planned widths (`token_elements`) and with every channel."""
        k_elements = v_elements = 0
        for layer in range(shape.num_layers):
            planned, whole = self.held_tokens(layer, shape, length)
            k, v = self.token_elements(layer, shape)
            full = math.prod(self.kv_heads(layer, shape))
            k_elements += planned * k + whole * full
            v_elements += planned * v + whole * full
        return batch * k_elements * _itemsize(dtype), batch * v_elements * _itemsize(dtype)

    def fingerprint(self) -> str:
        """A short hash of the plan's content, for reports and caches."""
        digest = hashlib.sha256(json.dumps({str(k): v for k, v in self.k_channels.items()}, sort_keys=True).encode())
        for layer, merge in self.merges.items():
            digest.update(json.dumps([layer, merge.groups, merge.heads_per_group, merge.rope]).encode())
            for tensor in merge.tensors().values():
                _hash_tensor(digest, tensor)
        for layer, update in self.updates.items():  # plans without updates keep their fingerprints
            digest.update(json.dumps([layer, sorted(update.factors)]).encode())
            for tensor in update.tensors().values():
                _hash_tensor(digest, tensor)
        if self.windowed:  # plans without windows keep the fingerprints they had before windows existed
            digest.update(json.dumps({"sink": self.sink, "recent": self.recent, "buffer": self.buffer}).encode())
        return digest.hexdigest()[:12]

    # -- validation ---------------------------------------------------------------------------

    def validate(self, shape: ModelShape) -> None:
        """Raise PlanError naming the layer, head and field of the first mismatch with `shape`."""
        if not self.k_channels and not self.merges:
            raise PlanError(
                "plan is empty: it names no layer. Use Plan.from_k_channels({layer: [[...], ...]}) "
                "with the kept channels of each KV head, or kvcompile.calibrate"
            )
        if self.model is not None:
            diffs = [  # a field the shape does not know (None) cannot differ, nor windows a plan did not record
                f"{name}: plan {getattr(self.model, name)!r}, model {getattr(shape, name)!r}"
                for name in ModelShape.__dataclass_fields__
                if getattr(shape, name) is not None and getattr(self.model, name) != getattr(shape, name)
                and not (name == "sliding_windows" and self.model.sliding_windows is None)
            ]
            if diffs:
                raise PlanError("plan was made for another model (" + "; ".join(diffs) + ")")
        for layer in [*self.merges, *self.k_channels, *self.updates]:
            if not 0 <= layer < shape.num_layers:
                raise PlanError(
                    f"plan layer {layer}: model has {shape.num_layers} layers (0..{shape.num_layers - 1})"
                )
        for layer, merge in self.merges.items():
            merge.validate(layer, shape)
        for layer, update in self.updates.items():
            update.validate(layer, shape)
        for layer, heads in self.k_channels.items():
            if self.windowed and shape.window(layer) is not None:
                raise PlanError(
                    f"layer {layer}, fields sink/recent: layer {layer} attends a sliding window of "
                    f"{shape.window(layer)} tokens, and a plan's full-channel windows apply to global layers only: "
                    f"leave layer {layer} out of k_channels, or use a plan without windows"
                )
            num_kv_heads, head_dim = self.kv_heads(layer, shape)
            merged = " (after merging)" if layer in self.merges else ""
            if len(heads) != num_kv_heads:
                raise PlanError(
                    f"layer {layer}, field k_channels: plan lists {len(heads)} KV heads, "
                    f"model has {num_kv_heads}{merged}"
                )
            for head, ids in enumerate(heads):
                if ids and ids[-1] >= head_dim:
                    raise PlanError(
                        f"layer {layer}, KV head {head}, field k_channels: channel {ids[-1]} "
                        f"out of range [0, {head_dim}){merged}"
                    )
        expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
        if self.importance is not None and tuple(self.importance.shape) != expected:
            raise PlanError(f"field importance: shape {tuple(self.importance.shape)}, expected (layers, KV heads, "
                            f"channels) = {expected}")

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `path/plan.json` and `path/tensors.safetensors`; returns the directory.

        Each file is replaced in one rename, the tensors first: an interrupted save over another
        plan leaves that plan, or files `load` refuses by name, never a mix that loads (stores.py)."""
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise PlanError(f"{directory}: exists and is not a directory (a plan is a directory)")
        tensors = {
            f"k_channels.{layer}": torch.tensor([c for ids in heads for c in ids], dtype=torch.int64)
            for layer, heads in self.k_channels.items()
        }
        for layer, merge in self.merges.items():
            tensors.update({f"merges.{layer}.{name}": t.detach().cpu().contiguous() for name, t in merge.tensors().items()})
        for layer, update in self.updates.items():
            tensors.update({f"updates.{layer}.{name}": t.detach().cpu().contiguous() for name, t in update.tensors().items()})
        if self.importance is not None:
            tensors["importance"] = self.importance.detach().cpu().float().contiguous()
        data, digest = tensors_bytes(tensors)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "tensors_sha256": digest,
            "model": None if self.model is None else _shape_document(self.model),
            "k_channels": {str(layer): list(self.kept_counts(layer)) for layer in self.k_channels},
            "merges": {
                str(layer): {
                    "groups": [list(group) for group in merge.groups],
                    "heads_per_group": merge.heads_per_group,
                    "rope": merge.rope,
                    "method": merge.method,
                }
                for layer, merge in self.merges.items()
            },
            **({"updates": {str(layer): sorted(update.factors) for layer, update in self.updates.items()}}
               if self.updates else {}),
            "sink": self.sink,
            "recent": self.recent,
            "buffer": self.buffer,
            "meta": dict(self.meta),
        }
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / _TENSORS_NAME, data)
        write_json(directory / _JSON_NAME, document)
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """The plan `save` wrote to `path`. A malformed, edited or half-written plan raises PlanError
        naming the file and the field; the content is checked against the fingerprint saved with it."""
        directory = Path(path)
        json_path = directory / _JSON_NAME
        if not json_path.exists():
            raise PlanError(f"{directory}: no {_JSON_NAME} (a plan is a directory written by Plan.save)")
        document = read_json(json_path, PlanError)
        fields = _Fields(json_path, document)
        if fields.get("format", str) != FORMAT:
            raise PlanError(f"{json_path}: not a kvcompile plan (format {document.get('format')!r})")
        version = fields.get("version", int)
        if version not in _READABLE_VERSIONS:
            raise PlanError(f"{json_path}: plan format version {version}, expected one of {_READABLE_VERSIONS}")
        checked = version >= 2  # version 1 plans were saved without integrity records
        tensors_path = directory / _TENSORS_NAME
        tensors = read_tensors(tensors_path, fields.get("tensors_sha256", str) if checked else None, PlanError)

        channels = {}
        for key, counts in fields.get("k_channels", dict).items():
            layer = fields.layer(key, "k_channels")
            counts = fields.int_list(counts, f"k_channels.{key}")
            flat = fields.tensor(tensors, f"k_channels.{key}", tensors_path).tolist()
            if sum(counts) != len(flat):
                raise PlanError(f"{json_path}: field k_channels.{key}: counts {counts} do not match the "
                                f"{len(flat)} ids stored in {tensors_path.name}")
            offsets = [0, *itertools.accumulate(counts)]
            channels[layer] = [flat[offsets[h] : offsets[h + 1]] for h in range(len(counts))]
        merges = {}
        for key, merge in fields.get("merges", dict, default={}).items():
            where = f"merges.{key}"
            layer = fields.layer(key, "merges")
            merge = fields.of_type(merge, dict, where)
            stored = {name: fields.tensor(tensors, f"{where}.{name}", tensors_path, finite=True) for name in _MERGE_TENSORS}
            groups = fields.of_type(merge.get("groups"), list, f"{where}.groups")
            groups = tuple(tuple(fields.int_list(group, f"{where}.groups")) for group in groups)
            merges[layer] = LayerMerge(
                groups, fields.of_type(merge.get("heads_per_group"), int, f"{where}.heads_per_group"),
                fields.of_type(merge.get("rope"), str, f"{where}.rope"), **stored,
                method=fields.of_type(merge.get("method"), str, f"{where}.method"),
            )  # fmt: skip
        updates = {}
        for key, names in fields.get("updates", dict, default={}).items():
            where = f"updates.{key}"
            layer = fields.layer(key, "updates")
            names = fields.of_type(names, list, where)
            if not names or not set(names) <= set(PROJECTIONS):
                raise PlanError(f"{json_path}: field {where}: expected some of {list(PROJECTIONS)}, got {names!r:.60}")
            updates[layer] = LayerUpdate({
                name: tuple(fields.tensor(tensors, f"{where}.{name}.{side}", tensors_path, finite=True) for side in "ba")
                for name in names})
        model = document.get("model")
        if model is not None:
            expected = set(ModelShape.__dataclass_fields__)
            # plans written before sliding windows were recorded have no `sliding_windows`
            if not expected - {"sliding_windows"} <= set(fields.of_type(model, dict, "model")) <= expected:
                raise PlanError(f"{json_path}: field model: expected keys {sorted(expected)}, got {sorted(model)}")
            for name in expected - {"model_type", "sliding_windows"}:
                fields.of_type(model[name], int, f"model.{name}")
            if model["model_type"] is not None:
                fields.of_type(model["model_type"], str, "model.model_type")
            windows = model.get("sliding_windows")
            if windows is not None:
                windows = tuple(None if w is None else fields.of_type(w, int, "model.sliding_windows")
                                for w in fields.of_type(windows, list, "model.sliding_windows"))
            model = ModelShape(**{**model, "sliding_windows": windows})
        # plans written before windows existed have none
        windows = {name: fields.get(name, int, default=default)
                   for name, default in (("sink", 0), ("recent", 0), ("buffer", DEFAULT_BUFFER))}
        plan = cls.from_k_channels(channels, model=model, meta=fields.get("meta", dict, default={}), **windows,
                                   importance=tensors.get("importance"))
        plan = plan.with_merges(merges) if merges else plan
        plan = plan.with_updates(updates) if updates else plan
        if checked and plan.fingerprint() != fields.get("fingerprint", str):
            raise PlanError(f"{json_path}: the plan it describes is not the one saved (fingerprint "
                            f"{plan.fingerprint()}, saved {document['fingerprint']}): it was edited")
        return plan

    @classmethod
    def list_builtin(cls) -> list[str]:
        """Names of the plans shipped with kvcompile, `model/plan`, for `load_builtin`."""
        return sorted(f"{path.parent.parent.name}/{path.parent.name}" for path in _BUILTIN.glob(f"*/*/{_JSON_NAME}"))

    @classmethod
    def load_builtin(cls, name: str) -> "Plan":
        """A plan shipped with kvcompile, e.g. "smollm2-135m-instruct/leank-k50" (see `list_builtin`)."""
        if name not in cls.list_builtin():
            raise PlanError(f"no built-in plan {name!r}; built-in plans: {', '.join(cls.list_builtin()) or 'none'}")
        return cls.load(_BUILTIN / name)

    @classmethod
    def load_path_or_builtin(cls, spec: str | Path) -> "Plan":
        """A plan from a directory `spec`, else the built-in plan of that name."""
        if Path(spec).exists():
            return cls.load(spec)
        if str(spec) not in cls.list_builtin():
            raise PlanError(f"{spec}: no such plan directory, nor a built-in plan ({', '.join(cls.list_builtin())})")
        return cls.load_builtin(str(spec))


def _joined_layers(old: Mapping[int, Any], new: Mapping[int, Any], field_name: str, kind: type) -> dict[int, Any]:
    """`old` with `new`'s layers added or replaced, by layer; PlanError naming a bad key or entry."""
    for layer, entry in new.items():
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise PlanError(f"field {field_name}: layer key {layer!r}: layer indices must be ints")
        if not isinstance(entry, kind):
            raise PlanError(f"layer {layer}, field {field_name}: expected a {kind.__name__}, got {type(entry).__name__}")
    return dict(sorted({**old, **new}.items()))


def _parse_head(layer: int, head: int, ids: Sequence[int]) -> tuple[int, ...]:
    where = f"layer {layer}, KV head {head}, field k_channels"
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise PlanError(f"{where}: expected a list of channel ids, got {type(ids).__name__}")
    out = []
    for pos, c in enumerate(ids):
        if isinstance(c, bool) or not isinstance(c, int):
            raise PlanError(f"{where}: channel ids must be ints, got {c!r} at position {pos}")
        if c < 0:
            raise PlanError(f"{where}: channel {c} out of range (negative)")
        if out and c == out[-1]:
            raise PlanError(f"{where}: channel {c} listed twice")
        if out and c < out[-1]:
            raise PlanError(f"{where}: channels not sorted ascending ({out[-1]} before {c} at position {pos})")
        out.append(c)
    return tuple(out)


def _shape_document(shape: ModelShape) -> dict:
    """plan.json's `model`: a model without sliding layers is written as before they were recorded."""
    document = vars(shape)
    if shape.sliding_windows is None:
        return {name: value for name, value in document.items() if name != "sliding_windows"}
    return document


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    """A tensor's bytes into `digest`, and its dtype where it is not float32 (the fingerprints of
    float32 plans stay what they were)."""
    if tensor.dtype != torch.float32:
        digest.update(str(tensor.dtype).encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_REQUIRED = object()  # `_Fields.get` without a default: the field must be there


class _Fields:
    """Typed access to a plan.json document: a PlanError names the file and the field on a mismatch."""

    def __init__(self, path: Path, document: Any):
        self.path = path
        self.document = self.of_type(document, dict, "(the document)")

    def get(self, name: str, kind: type, default: Any = _REQUIRED):
        if name not in self.document:
            if default is _REQUIRED:
                raise PlanError(f"{self.path}: field {name} is missing")
            return default
        return self.of_type(self.document[name], kind, name)

    def of_type(self, value: Any, kind: type, where: str):
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise PlanError(f"{self.path}: field {where}: expected {kind.__name__}, got {type(value).__name__} ({value!r:.40})")
        return value

    def int_list(self, value: Any, where: str) -> list[int]:
        for item in self.of_type(value, list, where):
            if self.of_type(item, int, where) < 0:
                raise PlanError(f"{self.path}: field {where}: expected non-negative ints, got {item}")
        return value

    def layer(self, key: str, where: str) -> int:
        if not key.isdigit():
            raise PlanError(f"{self.path}: field {where}: layer keys are non-negative integers, got {key!r}")
        return int(key)

    def tensor(self, tensors: dict[str, torch.Tensor], name: str, tensors_path: Path, finite: bool = False) -> torch.Tensor:
        if name not in tensors:
            raise PlanError(f"{tensors_path}: no tensor {name!r}, which {self.path.name} refers to")
        tensor = tensors[name]
        if finite and not bool(torch.isfinite(tensor).all()):
            raise PlanError(f"{tensors_path}: tensor {name!r} holds NaN or infinite values")
        return tensor
