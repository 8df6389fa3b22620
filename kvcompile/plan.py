"""The plan: what kvcompile keeps of each layer's KV cache.

A plan is data. Its readable part (counts, model fingerprint, provenance) is JSON; its index
tensors live in a safetensors file beside it. Loading never unpickles.

K-channel part (LeanK): for each planned layer, for each KV head, the sorted ids of the post-RoPE
key channels that are kept. Counts may differ between heads; a head may keep none. Layers absent
from the plan keep every channel.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Plan:
    """Per-layer compression decisions. Build with `from_k_channels`, or load a saved one."""

    k_channels: Mapping[int, tuple[tuple[int, ...], ...]]
    model: ModelShape | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

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

    # -- queries ------------------------------------------------------------------------------

    def kept_counts(self, layer: int) -> tuple[int, ...]:
        return tuple(len(ids) for ids in self.k_channels[layer])

    def k_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        """Bytes of K one token occupies in the cache, summed over layers (batch 1)."""
        per_layer = [
            sum(self.kept_counts(layer)) if layer in self.k_channels else shape.num_kv_heads * shape.head_dim
            for layer in range(shape.num_layers)
        ]
        return sum(per_layer) * _itemsize(dtype)

    def v_bytes_per_token(self, shape: ModelShape, dtype: torch.dtype) -> int:
        return shape.num_layers * shape.num_kv_heads * shape.head_dim * _itemsize(dtype)

    def cache_nbytes(self, shape: ModelShape, dtype: torch.dtype, batch: int, length: int) -> int:
        """Bytes of K and V the compressed cache holds for `batch` sequences of `length` tokens."""
        return batch * length * (self.k_bytes_per_token(shape, dtype) + self.v_bytes_per_token(shape, dtype))

    def fingerprint(self) -> str:
        """A short hash of the plan's content, for reports and caches."""
        payload = json.dumps({str(k): v for k, v in self.k_channels.items()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    # -- validation ---------------------------------------------------------------------------

    def validate(self, shape: ModelShape) -> None:
        """Raise PlanError naming the layer, head and field of the first mismatch with `shape`."""
        if not self.k_channels:
            raise PlanError(
                "plan is empty: it names no layer. Use Plan.from_k_channels({layer: [[...], ...]}) "
                "with the kept channels of each KV head"
            )
        if self.model is not None and self.model != shape:
            diffs = [
                f"{name}: plan {getattr(self.model, name)!r}, model {getattr(shape, name)!r}"
                for name in ModelShape.__dataclass_fields__
                if getattr(self.model, name) != getattr(shape, name)
            ]
            raise PlanError("plan was made for another model (" + "; ".join(diffs) + ")")
        for layer, heads in self.k_channels.items():
            if not 0 <= layer < shape.num_layers:
                raise PlanError(
                    f"plan layer {layer}: model has {shape.num_layers} layers (0..{shape.num_layers - 1})"
                )
            if len(heads) != shape.num_kv_heads:
                raise PlanError(
                    f"layer {layer}, field k_channels: plan lists {len(heads)} KV heads, "
                    f"model has {shape.num_kv_heads}"
                )
            for head, ids in enumerate(heads):
                if ids and ids[-1] >= shape.head_dim:
                    raise PlanError(
                        f"layer {layer}, KV head {head}, field k_channels: channel {ids[-1]} "
                        f"out of range [0, {shape.head_dim})"
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
            "meta": dict(self.meta),
        }
        tensors = {
            f"k_channels.{layer}": torch.tensor([c for ids in heads for c in ids], dtype=torch.int64)
            for layer, heads in self.k_channels.items()
        }
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
        model = None if document.get("model") is None else ModelShape(**document["model"])
        return cls.from_k_channels(channels, model=model, meta=document.get("meta", {}))


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
