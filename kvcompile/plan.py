"""The plan: what kvcompile keeps of each layer's KV cache.

A plan is data. Its readable part (counts, model fingerprint, provenance) is JSON; its index
tensors live in a safetensors file beside it. Loading never unpickles.

K-channel part (LeanK): for each planned layer, for each KV head, the sorted ids of the post-RoPE
key channels that are kept. Counts may differ between heads; a head may keep none. Layers absent
from the plan keep every channel.

Merge part (KV-head merging): for each merged layer, groups of t KV heads, each becoming one KV
head of s·d channels (s sub-heads of the original width d; s = 1 is plain GQA with fewer heads),
through `down`/`up` maps (see bases.py). Merging comes first: a layer's K channels then index its
merged heads.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

FORMAT = "kvcompile.plan"
FORMAT_VERSION = 1
_JSON_NAME = "plan.json"
_TENSORS_NAME = "tensors.safetensors"


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that a plan depends on; checked before any rewrite."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            model_type=text.model_type,
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            num_heads=num_heads,
            head_dim=head_dim,
        )


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


@dataclass(frozen=True)
class Plan:
    """Per-layer compression decisions. Build with `from_k_channels`, or load a saved one."""

    k_channels: Mapping[int, tuple[tuple[int, ...], ...]]
    model: ModelShape | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    merges: Mapping[int, LayerMerge] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_k_channels(
        cls,
        channels: Mapping[int, Sequence[Sequence[int]]],
        *,
        model: ModelShape | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> "Plan":
        """`{layer: [[kept channel ids of KV head 0], [... head 1], ...]}`.

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
        return cls(dict(sorted(parsed.items())), model, dict(meta or {}))

    def with_merges(self, merges: Mapping[int, LayerMerge]) -> "Plan":
        """This plan with KV-head merges for some layers (its K channels then index merged heads)."""
        for layer, merge in merges.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise PlanError(f"merge layer key {layer!r}: layer indices must be ints")
            if not isinstance(merge, LayerMerge):
                raise PlanError(f"layer {layer}, field merges: expected a LayerMerge, got {type(merge).__name__}")
        return replace(self, merges=dict(sorted({**self.merges, **merges}.items())))

    # -- queries ------------------------------------------------------------------------------

    def kept_counts(self, layer: int) -> tuple[int, ...]:
        return tuple(len(ids) for ids in self.k_channels[layer])

    def kv_heads(self, layer: int, shape: ModelShape) -> tuple[int, int]:
        """(KV heads, channels per head) of `layer` once its merge, if any, is applied."""
        merge = self.merges.get(layer)
        if merge is None:
            return shape.num_kv_heads, shape.head_dim
        return len(merge.groups), merge.merged_head_dim(shape.head_dim)

    def k_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        """Bytes of K one token occupies in the cache, summed over layers (batch 1)."""
        per_layer = [
            sum(self.kept_counts(layer)) if layer in self.k_channels else math.prod(self.kv_heads(layer, shape))
            for layer in range(shape.num_layers)
        ]
        return sum(per_layer) * _itemsize(dtype)

    def v_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        return sum(math.prod(self.kv_heads(layer, shape)) for layer in range(shape.num_layers)) * _itemsize(dtype)

    def cache_nbytes(self, shape: ModelShape, dtype: torch.dtype, batch: int, length: int) -> int:
        """Bytes of K and V the compressed cache holds for `batch` sequences of `length` tokens."""
        return batch * length * (self.k_bytes_per_token(shape, dtype) + self.v_bytes_per_token(shape, dtype))

    def fingerprint(self) -> str:
        """A short hash of the plan's content, for reports and caches."""
        digest = hashlib.sha256(json.dumps({str(k): v for k, v in self.k_channels.items()}, sort_keys=True).encode())
        for layer, merge in self.merges.items():
            digest.update(json.dumps([layer, merge.groups, merge.heads_per_group, merge.rope]).encode())
            for tensor in merge.tensors().values():
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    # -- validation ---------------------------------------------------------------------------

    def validate(self, shape: ModelShape) -> None:
        """Raise PlanError naming the layer, head and field of the first mismatch with `shape`."""
        if not self.k_channels and not self.merges:
            raise PlanError(
                "plan is empty: it names no layer. Use Plan.from_k_channels({layer: [[...], ...]}) "
                "with the kept channels of each KV head, or kvcompile.calibrate"
            )
        if self.model is not None and self.model != shape:
            diffs = [
                f"{name}: plan {getattr(self.model, name)!r}, model {getattr(shape, name)!r}"
                for name in ModelShape.__dataclass_fields__
                if getattr(self.model, name) != getattr(shape, name)
            ]
            raise PlanError("plan was made for another model (" + "; ".join(diffs) + ")")
        for layer in [*self.merges, *self.k_channels]:
            if not 0 <= layer < shape.num_layers:
                raise PlanError(
                    f"plan layer {layer}: model has {shape.num_layers} layers (0..{shape.num_layers - 1})"
                )
        for layer, merge in self.merges.items():
            merge.validate(layer, shape)
        for layer, heads in self.k_channels.items():
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

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `path/plan.json` and `path/tensors.safetensors`; returns the directory."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": None if self.model is None else vars(self.model),
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
            "meta": dict(self.meta),
        }
        tensors = {
            f"k_channels.{layer}": torch.tensor([c for ids in heads for c in ids], dtype=torch.int64)
            for layer, heads in self.k_channels.items()
        }
        for layer, merge in self.merges.items():
            tensors.update({f"merges.{layer}.{name}": t.contiguous() for name, t in merge.tensors().items()})
        save_file(tensors, str(directory / _TENSORS_NAME))
        (directory / _JSON_NAME).write_text(json.dumps(document, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        directory = Path(path)
        json_path = directory / _JSON_NAME
        if not json_path.is_file():
            raise PlanError(f"{directory}: no {_JSON_NAME} (a plan is a directory written by Plan.save)")
        document = json.loads(json_path.read_text())
        if document.get("format") != FORMAT:
            raise PlanError(f"{json_path}: not a kvcompile plan (format {document.get('format')!r})")
        if document.get("version") != FORMAT_VERSION:
            raise PlanError(f"{json_path}: plan format version {document.get('version')}, expected {FORMAT_VERSION}")
        tensors = load_file(str(directory / _TENSORS_NAME))
        channels = {}
        for key, counts in document["k_channels"].items():
            flat = tensors[f"k_channels.{key}"].tolist()
            if sum(counts) != len(flat):
                raise PlanError(f"{directory}: layer {key}: counts {counts} do not match {len(flat)} stored ids")
            offsets = [sum(counts[:h]) for h in range(len(counts) + 1)]
            channels[int(key)] = [flat[offsets[h] : offsets[h + 1]] for h in range(len(counts))]
        merges = {}
        for key, fields in document.get("merges", {}).items():
            stored = {name: tensors[f"merges.{key}.{name}"] for name in ("key_down", "key_up", "value_down", "value_up")}
            groups = tuple(tuple(group) for group in fields["groups"])
            merges[int(key)] = LayerMerge(groups, fields["heads_per_group"], fields["rope"], **stored, method=fields["method"])
        model = None if document.get("model") is None else ModelShape(**document["model"])
        plan = cls.from_k_channels(channels, model=model, meta=document.get("meta", {}))
        return plan.with_merges(merges) if merges else plan


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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
