"""A transformers `Cache` in a plan's compressed layout, for models compiled with the kvcompile backend.

    cache = kvcompile.cache_for(model, plan, batch_size=2, max_cache_len=4096)
    model.forward = torch.compile(model.forward, backend="kvcompile", options={"plan": plan})
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Each layer allocates the entries of the plan's layout (layout.py) once, `max_cache_len` slots per
row, with each row's token count on the device (`lengths`). Its `update` passes the new key and
value to `kvcompile::cache_site`, which the backend's pass lowers, with the attention behind it,
into the plan's writes and attention over those entries (passes/cache_sites.py). Rows count their
own tokens as the runtime's cache does: a prompt's padding never enters, row b holds its real
tokens in slots [0, lengths[b]). A step changes tensors only, in place, so decode compiles once and
can be replayed from a CUDA graph (`mode="reduce-overhead"`).

Windowed layers hold the runtime's regions without ever moving a token: every token's kept
channels go to the middle when it arrives (slot t - sink), and its full channels to the window,
whose first `sink` slots hold the sink and the rest are a ring of `recent + buffer` slots. The
middle count follows `plan.middle_length` and the window holds the tokens after it, as the
runtime's flushes leave them; O(window) work every `buffer` tokens becomes none at all.

A sliding-window layer (window W) holds a ring of W slots: token t in slot t % W, its last W - 1
tokens kept for later queries (transformers' sliding layers keep as many), one-token steps after
the prompt.

What transformers sees follows its conventions: `get_seq_length()` counts every position the
model was called with, padding included (a tensor inside a compiled region, as StaticCache's).
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import kvcompile.kernels  # noqa: F401  (registers kvcompile::cache_site)
from kvcompile.passes.cache_sites import site_constants, window_ring, windowed_layer

from .layout import FULL, MIDDLE, RING, WINDOW, entry_region, layer_entries
from .plan import ModelShape, Plan


class StaticCompressedLayer(CacheLayerMixin):
    """One layer's entries, per-row counts and the constants its lowered attention reads."""

    # transformers' generate compiles the forward by itself (with inductor alone) for compileable
    # caches; this one runs under the kvcompile backend, which the user picks
    is_compileable = False
    is_sliding = False

    def __init__(self, plan: Plan, fingerprint: str, shape: ModelShape, layer: int, max_cache_len: int,
                 lengths: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.plan, self.shape, self.layer, self.plan_fingerprint = plan, shape, layer, fingerprint
        self.max_cache_len = max_cache_len
        self.windowed = windowed_layer(plan, layer)
        self.window = shape.window(layer)
        self.is_sliding = self.window is not None  # transformers builds its sliding mask for such layers
        slots = {FULL: max_cache_len, MIDDLE: max_cache_len + plan.sink, WINDOW: plan.sink + window_ring(plan),
                 RING: self.window}
        batch_size, device = lengths.shape[0], lengths.device
        self.entries = {
            name: torch.zeros(batch_size, heads, slots[entry_region(plan, shape, name)], width, dtype=dtype, device=device)
            for name, (heads, width) in layer_entries(plan, layer, shape).items()
        }
        self.constants = site_constants(plan, layer, shape, dtype, device)
        # every layer's rows hold the same tokens: one count per row (and one position count, what
        # get_seq_length reports) for the whole cache, so a step computes its slots once
        self.lengths, self.positions = lengths, positions
        self.holds_tokens = False  # host state dynamo guards on: a prompt and a decode step compile apart
        self.is_initialized = True
        for tensor in [*self.entries.values(), *self.constants.values()]:
            torch._dynamo.mark_static_address(tensor)  # fixed addresses: CUDA graphs replay over them

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the entries were allocated with the layer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[2] > self.max_cache_len:
            raise ValueError(f"layer {self.layer}: {key_states.shape[2]} tokens do not fit the cache's max_cache_len "
                             f"of {self.max_cache_len}; make it with a larger kvcompile.cache_for(..., max_cache_len=)")
        if (self.windowed or self.is_sliding) and self.holds_tokens and key_states.shape[2] > 1:
            kind = "windowed plan" if self.windowed else "sliding-window layer"
            raise ValueError(f"layer {self.layer}: a call continuing a {kind}'s cache adds one token per row "
                             f"(got {key_states.shape[2]}): its window is a ring sized for one (as generate() calls)")
        keys, values = torch.ops.kvcompile.cache_site(
            key_states, value_states, self.lengths, list(self.entries.values()), list(self.constants.values()),
            self.layer, self.plan_fingerprint, not self.holds_tokens, self.window or 0,
        )
        if self.layer == 0:
            self.positions.add_(key_states.shape[2])
        self.holds_tokens = True
        return keys, values

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # the lowered attention reads HF's mask at a prompt only, for its padding: (S, S) is all it
        # needs (transformers before 5.2x passes the call's cache_position instead of its length)
        length = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        return length, 0

    def get_seq_length(self):
        if not self.holds_tokens:
            return 0
        return self.positions if torch.compiler.is_compiling() else int(self.positions)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.lengths.zero_()
        self.positions.zero_()
        self.holds_tokens = False

    def hold_random_tokens(self, length: int, generator: torch.Generator | None = None) -> None:
        for entry in self.entries.values():
            entry.normal_(generator=generator)
        self.lengths.fill_(length)
        self.positions.fill_(length)
        self.holds_tokens = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """This layer's entries in the order of `beam_idx` (the cache reorders the shared counts)."""
        beam_idx = beam_idx.to(self.lengths.device)
        for entry in self.entries.values():
            entry.copy_(entry.index_select(0, beam_idx))

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held, every row counted at its own length in each region."""
        rows = self.lengths.tolist()
        middle = sum(self.plan.middle_length(n) for n in rows)
        held = {FULL: sum(rows), MIDDLE: middle, WINDOW: sum(rows) - middle}
        if self.is_sliding:
            held[RING] = sum(min(n, self.window - 1) for n in rows)
        return sum(entry.shape[1] * entry.shape[3] * entry.element_size()
                   * held[entry_region(self.plan, self.shape, name)]
                   for name, entry in self.entries.items())


class StaticCompressedCache(Cache):
    """The plan's compressed cache as a transformers `Cache`; make it with `kvcompile.cache_for`."""

    def __init__(self, plan: Plan, shape: ModelShape, batch_size: int, max_cache_len: int, dtype: torch.dtype,
                 device: torch.device):
        fingerprint = plan.fingerprint()
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros((), dtype=torch.int64, device=device)
        for tensor in (self.lengths, self.positions):
            torch._dynamo.mark_static_address(tensor)
        super().__init__(layers=[
            StaticCompressedLayer(plan, fingerprint, shape, layer, max_cache_len, self.lengths, self.positions, dtype)
            for layer in range(shape.num_layers)
        ])
        self.plan, self.shape = plan, shape
        _PLANS[fingerprint] = plan

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows in the order of `beam_idx` (beam search)."""
        super().reorder_cache(beam_idx)
        self.lengths.copy_(self.lengths.index_select(0, beam_idx.to(self.lengths.device)))

    def hold_random_tokens(self, length: int, generator: torch.Generator | None = None) -> None:
        """Every row holds `length` standard-normal tokens, as if a prompt had been written: for
        benchmarks, whose decode speed depends on the cache's length, not on what it holds."""
        if not 0 < length < self.max_cache_len:
            raise ValueError(f"length must be in [1, {self.max_cache_len}) (max_cache_len), got {length}")
        for layer in self.layers:
            layer.hold_random_tokens(length, generator)

    @property
    def max_batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def row_lengths(self) -> list[int]:
        """Each row's real tokens held (a host sync)."""
        return self.lengths.tolist()

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tokens held: the plan's `cache_nbytes` for these rows."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def capacity_nbytes(self) -> int:
        """Bytes allocated for the entries."""
        return sum(entry.nbytes for layer in self.layers for entry in layer.entries.values())

    def __repr__(self) -> str:
        return (f"StaticCompressedCache(plan={self.layers[0].plan_fingerprint}, batch_size={self.max_batch_size}, "
                f"max_cache_len={self.max_cache_len}, capacity_nbytes={self.capacity_nbytes})")


# The plans of live caches by fingerprint: a graph on a cache names its plan, so the backend needs
# no plan option when the model runs on one (and torch.compile's mode= can be given instead).
_PLANS: "weakref.WeakValueDictionary[str, Plan]" = weakref.WeakValueDictionary()


def plan_of_cache(fingerprint: str) -> Plan | None:
    """The plan of a live StaticCompressedCache made under the plan of this fingerprint, if any."""
    return _PLANS.get(fingerprint)


def cache_for(model: torch.nn.Module, plan: Plan, *, batch_size: int, max_cache_len: int) -> StaticCompressedCache:
    """An empty compressed cache for `model` under `plan` (checked as `kvcompile.transform` checks
    it), `batch_size` rows of `max_cache_len` tokens each (prompt and generated, padding excluded),
    on the model's device and in its dtype. A prompt longer than that is refused; a decode step past
    it is not checked on the host (that would wait for the GPU every step) and fails in the write."""
    from .runtime import checked_model_shape

    shape = checked_model_shape(model, plan)
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    param = next(model.parameters())
    return StaticCompressedCache(plan, shape, batch_size, max_cache_len, param.dtype, param.device)

