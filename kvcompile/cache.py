"""The compressed KV cache a transformed model keeps between calls: buffers written in place.

Each entry of the plan's layout (layout.py) is a buffer (B, H, capacity, w). Row b holds its tokens
in slots [0, count_b) and nothing is copied when a call adds tokens: the decode program writes
them at each row's next slots (`kvcompile::write_cache`) and attends up to each row's count
(passes/write_cache_in_place.py). Rows count their own tokens (`lengths`), so the rows of a padded
batch hold exactly their real tokens: a prompt's padding never enters the cache.

Which count a buffer's rows follow is its region (layout.entry_region): FULL entries hold every
token of the row, a windowed layer's WINDOW holds the first `sink` tokens then the latest ones, and
its MIDDLE the tokens between, `plan.middle_length(length)` of them. Windows have fixed slots: when
a row's window is full the runtime moves `plan.buffer` tokens from its front (after the sink) to the
end of the middle, keeping their kept channels, and moves the window's remaining recent tokens down
by as much: O(window) work once every `buffer` tokens, never O(length).

A sliding-window layer's buffers are RINGs: token t of a row in slot t % C, C = window - 1 + the
tokens of the largest call so far, so a row holds its last window - 1 tokens (all a later query
sees) and a call overwrites only tokens no query sees. A larger call regrows the rings, once.

Capacity grows by doubling when a call would overflow it (or is set once with `max_cache_len`).
A cache records the plan and model shape that wrote it; a model refuses a cache of another plan.
Like transformers' caches, a call extends the cache it is given; `copy()` gives an independent one.
"""

from __future__ import annotations

import torch

import kvcompile.kernels  # noqa: F401  (registers gather_kv_channels and write_cache)
from kvcompile.kernels.ops import ring_tokens

from .layout import (
    FULL,
    MIDDLE,
    RING,
    WINDOW,
    entry_kind,
    entry_layer,
    entry_region,
    k_groups,
    key_entry,
    key_window_entry,
    value_entry,
    value_window_entry,
)
from .plan import ModelShape, Plan
from .program import CACHE_LENGTHS, CACHE_SLOTS, MIDDLE_LENGTHS, WINDOW_LENGTHS, WINDOW_SLOTS

MIN_CAPACITY = 64


class CacheMismatch(ValueError):
    """A cache handed to a model that did not write it (another plan, another model, another batch)."""


class CompressedKVCache:
    """Named cache buffers with per-row token counts, written in place by the model that made it."""

    # what transformers' generate asks of a cache: the transformed model replays its own decode
    # graphs (graphs.py), so generate must not compile the step around them
    is_compileable = False

    @property
    def is_linear(self) -> list[bool]:
        """transformers' question (5.24 on): which layers hold recurrent state instead of tokens."""
        return [False] * self.shape.num_layers

    def __init__(self, plan: Plan, shape: ModelShape):
        self.plan, self.shape = plan, shape
        self.plan_fingerprint = plan.fingerprint()
        self.buffers: dict[str, torch.Tensor] = {}
        self.row_lengths: list[int] = []  # tokens of each row, kept on the host: no device sync to read them
        self.lengths: torch.Tensor | None = None  # the same, (B,) int64 on the cache's device, for the programs
        # each row's middle count (windowed plans) on the device; it changes only when tokens move to
        # the middle, so steps read it without copying host counts over (a copy would wait for the GPU)
        self.middle_lengths: torch.Tensor | None = None
        # positions the model was called with, padding included: transformers' sequence length, the
        # width of the attention_mask's past, from which generate continues a cache
        self.positions = 0
        self._regions: dict[str, str] = {}  # entry name -> its region: every step asks, per buffer

    def _region(self, name: str) -> str:
        region = self._regions.get(name)
        if region is None:
            region = self._regions[name] = entry_region(self.plan, self.shape, name)
        return region

    # -- what it holds ----------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """The longest row's token count."""
        return max(self.row_lengths, default=0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions the model was called with, padding included (each row's own count is in
        `row_lengths`): where transformers' `generate` takes up `input_ids` and `attention_mask`."""
        return self.positions

    def __len__(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int:
        return len(self.row_lengths)

    def region_lengths(self, region: str) -> list[int]:
        """Each row's token count in buffers of `region` (layout.FULL, WINDOW or MIDDLE)."""
        if region == FULL:
            return list(self.row_lengths)
        middle = [self.plan.middle_length(n) for n in self.row_lengths]
        return middle if region == MIDDLE else [n - m for n, m in zip(self.row_lengths, middle)]

    def entry_lengths(self, name: str) -> list[int]:
        """Each row's token count in buffer `name`: its region's, or a sliding layer's last
        window - 1 (what its ring holds for later queries)."""
        window = self.shape.window(entry_layer(name))
        if window is not None:
            return [min(n, window - 1) for n in self.row_lengths]
        return self.region_lengths(self._region(name))

    @property
    def entries(self) -> dict[str, torch.Tensor]:
        """Each buffer's slots up to its region's longest row: views, no copy (a shorter row's
        slots past its own count hold no token of it); a ring's slots that may hold a token, in
        ring order."""
        return {name: buffer[:, :, : self._longest_slots(name, buffer)] for name, buffer in self.buffers.items()}

    def _longest_slots(self, name: str, buffer: torch.Tensor) -> int:
        if self._region(name) == RING:
            return min(buffer.shape[2], self.length)
        return max(self.entry_lengths(name), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tokens held (every row counted at its own length)."""
        return self.k_nbytes + self.v_nbytes

    @property
    def k_nbytes(self) -> int:
        return self._held_nbytes(("key", "key_window"))

    @property
    def v_nbytes(self) -> int:
        return self._held_nbytes(("value", "value_window"))

    @property
    def capacity_nbytes(self) -> int:
        """Bytes allocated for the buffers, held tokens and free slots."""
        return sum(buffer.nbytes for buffer in self.buffers.values())

    def _held_nbytes(self, kinds: tuple[str, ...]) -> int:
        total = 0
        for name, buffer in self.buffers.items():
            if entry_kind(name) in kinds:
                per_token = buffer.shape[1] * buffer.shape[3] * buffer.element_size()
                total += per_token * sum(self.entry_lengths(name))
        return total

    def copy(self) -> "CompressedKVCache":
        """An independent cache holding the same tokens (the buffers are cloned): a branch point."""
        clone = CompressedKVCache(self.plan, self.shape)
        clone.buffers = {name: buffer.clone() for name, buffer in self.buffers.items()}
        clone.row_lengths, clone.positions = list(self.row_lengths), self.positions
        clone.lengths = None if self.lengths is None else self.lengths.clone()
        clone.middle_lengths = None if self.middle_lengths is None else self.middle_lengths.clone()
        return clone

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Rows in the order of `beam_idx` (transformers' beam search), in place: the buffers keep
        their addresses, which the decode graphs replay over."""
        beam_idx = beam_idx.to(self.lengths.device)
        for buffer in self.buffers.values():
            buffer.copy_(buffer.index_select(0, beam_idx))
        self.row_lengths = [self.row_lengths[row] for row in beam_idx.tolist()]
        self.lengths = self.lengths.index_select(0, beam_idx)
        if self.middle_lengths is not None:
            self.middle_lengths = self.middle_lengths.index_select(0, beam_idx)

    def check_written_by(self, plan: Plan, shape: ModelShape) -> None:
        """Raise CacheMismatch unless this cache was written under `plan` for a model of `shape`."""
        if self.shape != shape:
            raise CacheMismatch(f"this cache was written for a model of shape {self.shape}, not {shape}")
        if plan is self.plan:  # every step of a model on its own cache: hashing the plan would cost a millisecond
            return
        fingerprint = plan.fingerprint()
        if self.plan_fingerprint != fingerprint:
            raise CacheMismatch(f"this cache was written under plan {self.plan_fingerprint}; this model's plan is "
                                f"{fingerprint}. A cache holds one plan's layout: use the model that returned it")

    def __repr__(self) -> str:
        return (f"CompressedKVCache(plan={self.plan_fingerprint}, rows={self.row_lengths}, nbytes={self.nbytes}, "
                f"capacity_nbytes={self.capacity_nbytes})")

    # -- writing: the prefill's tokens ---------------------------------------------------------------

    def write_prompt(self, present: dict[str, torch.Tensor], valid: torch.Tensor | None,
                     capacity: int | None = None) -> None:
        """Hold a prefill's cache outputs (B, H, S, w), prompt order, in an empty cache (`present` is
        emptied: its tensors are copied into the buffers one at a time, and dropped).

        `valid` (B, S) bool marks each row's real tokens (None: all); they go to slots [0, n_b) in
        order, padding nowhere. `capacity`: slots to allocate per row, exactly (default: room to
        grow); the windowed layers' middles get what rows of that many tokens hold."""
        if self.buffers:
            raise CacheMismatch("write_prompt needs an empty cache; this one holds tokens")
        some = next(iter(present.values()))
        batch, seq, device = some.shape[0], some.shape[2], some.device
        self.positions = seq
        if valid is None:
            self.row_lengths = [seq] * batch
            tokens = dict(present)
        else:
            self.row_lengths = valid.sum(1).tolist()
            # each row's real tokens first, in order (a stable sort of "is padding")
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
            tokens = {name: _take_tokens(tensor, order) for name, tensor in present.items()}
        present.clear()  # the prompt's tokens live on in the buffers only: free each as it is copied
        self.lengths = torch.tensor(self.row_lengths, dtype=torch.int64, device=device)
        self._count_middle()
        longest = self.length
        # a given capacity is allocated as given (a reader that attends over whole buffers, the ONNX
        # decode, pays for every slot); else room to grow
        full = max(capacity, longest) if capacity else _grown(longest, longest + 1)
        for name in [name for name in tokens if self._region(name) == FULL]:
            self.buffers[name] = _with_capacity(tokens.pop(name)[:, :, :longest], full)
        for name in [name for name in tokens if self._region(name) == RING]:
            ring = self.ring_capacity(entry_layer(name), 1)
            self.buffers[name] = _take_tokens(tokens.pop(name), _ring_sources(self.lengths, ring))
        for layer in self._windowed_layers(tokens):
            self._split_window(layer, tokens, full)

    def _windowed_layers(self, tokens: dict[str, torch.Tensor]) -> list[int]:
        return [layer for layer in self.plan.k_channels if key_window_entry(layer) in tokens]

    def _split_window(self, layer: int, tokens: dict[str, torch.Tensor], capacity: int) -> None:
        """A windowed layer's prompt tokens (compacted, every channel) into its window and middle."""
        plan, device, middle = self.plan, self.lengths.device, self.middle_lengths
        keys, values = tokens[key_window_entry(layer)], tokens[value_window_entry(layer)]
        last = keys.shape[2] - 1
        window_slots = torch.arange(self.window_capacity(1), device=device)
        # window slot j holds token j in the sink, else token j + M_b (the tokens after the middle)
        source = torch.where(window_slots < plan.sink, window_slots, window_slots + middle[:, None]).clamp(max=last)
        self.buffers[key_window_entry(layer)] = _take_tokens(keys, source)
        self.buffers[value_window_entry(layer)] = _take_tokens(values, source)
        # the middle of `capacity` tokens: rows of that many tokens will not outgrow it
        middle_capacity = max(MIN_CAPACITY, max(self.region_lengths(MIDDLE)), plan.middle_length(capacity))
        source = (plan.sink + torch.arange(middle_capacity, device=device)).clamp(max=last).expand(len(middle), -1)
        for name, moved in self._middle_tokens(layer, _take_tokens(keys, source), _take_tokens(values, source)).items():
            self.buffers[name] = moved

    def _middle_tokens(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-channel window tokens as the middle keeps them: kept K channels per width group,
        V of the non-streaming heads."""
        device = keys.device
        moved = {
            key_entry(layer, group.width): torch.ops.kvcompile.gather_kv_channels(
                keys, group.heads_tensor().to(device), group.channels_tensor().to(device)
            )
            for group in k_groups(self.plan, layer)
        }
        heads = torch.tensor(self.plan.middle_value_heads(layer), dtype=torch.int64, device=device)
        moved[value_entry(layer)] = values.index_select(1, heads)
        return moved

    def ring_capacity(self, layer: int, new_tokens: int) -> int:
        """Ring slots a sliding layer needs for a call of `new_tokens`: the window - 1 tokens its
        first query sees before its own, and the call's."""
        return self.shape.window(layer) - 1 + new_tokens

    def window_capacity(self, new_tokens: int) -> int:
        """Window slots a call of `new_tokens` needs: the sink, the recent tokens, a buffer not
        yet moved, and the call's."""
        return self.plan.sink + self.plan.recent + self.plan.buffer + new_tokens

    # -- writing: a decode call's tokens -------------------------------------------------------------

    def prepare_call(self, new_tokens: int, real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The decode program's index inputs for a call of `new_tokens` tokens per row, growing the
        buffers first where they would overflow. `real` (B,): how many of its row's tokens are real,
        the last ones (a left-padded call; default all). A row's real tokens go to the slots after
        its own, its padding to the slots after those, which hold no token of the row: the
        attention rule (query i sees slots up to count - S + i) then gives each real query its
        row's tokens and no padding, and a ring's padding lands on tokens older than any query sees."""
        self._reserve(FULL, max(self.region_lengths(FULL), default=0) + new_tokens)
        self._reserve_rings(new_tokens)
        step = torch.arange(new_tokens, device=self.lengths.device)[None]  # (1, S): each token's slot after the row's
        added = new_tokens
        if real is not None:
            added = real.to(self.lengths.device)
            step = (step - (new_tokens - added)[:, None]) % new_tokens  # real tokens first, then the padding
        inputs = {CACHE_SLOTS: self.lengths[:, None] + step, CACHE_LENGTHS: self.lengths + added}
        if self.plan.windowed:
            self._reserve(WINDOW, self.window_capacity(new_tokens))
            window = self.lengths - self.middle_lengths
            inputs.update({WINDOW_SLOTS: window[:, None] + step, WINDOW_LENGTHS: window + added,
                           MIDDLE_LENGTHS: self.middle_lengths})
        return inputs

    def advance(self, new_tokens: int, real: torch.Tensor | None = None) -> None:
        """Count a call's `new_tokens` per row, or the `real` (B,) of them (prepare_call's), which
        the program wrote; then move full windows' oldest recent tokens to the middle."""
        before = self.region_lengths(MIDDLE)
        self.positions += new_tokens
        if real is None:
            self.row_lengths = [n + new_tokens for n in self.row_lengths]
            self.lengths = self.lengths + new_tokens
        else:
            self.row_lengths = [n + int(a) for n, a in zip(self.row_lengths, real.tolist())]
            self.lengths = self.lengths + real.to(self.lengths)
        if self.plan.windowed:
            self._flush(before)

    def _flush(self, middle_before: list[int]) -> None:
        moved = [after - before for after, before in zip(self.region_lengths(MIDDLE), middle_before)]
        count = max(moved)
        if count == 0:
            return
        self._count_middle()
        self._reserve(MIDDLE, max(middle_before) + count)
        device, sink = self.lengths.device, self.plan.sink
        step = torch.arange(count, device=device)
        # rows moving fewer than `count` write their extra tokens past their middle's end: unread slots
        destination = torch.tensor(middle_before, device=device)[:, None] + step
        shift = torch.tensor(moved, device=device)[:, None]
        for layer in self._windowed_layers(self.buffers):
            key_window, value_window = self.buffers[key_window_entry(layer)], self.buffers[value_window_entry(layer)]
            middle = self._middle_tokens(layer, key_window[:, :, sink : sink + count], value_window[:, :, sink : sink + count])
            for name, tokens in middle.items():
                torch.ops.kvcompile.write_cache(self.buffers[name], tokens, destination)
            slots = torch.arange(key_window.shape[2], device=device)
            source = torch.where(slots < sink, slots, slots + shift).clamp(max=key_window.shape[2] - 1)
            key_window.copy_(_take_tokens(key_window, source))
            value_window.copy_(_take_tokens(value_window, source))

    def _count_middle(self) -> None:
        if self.plan.windowed:
            self.middle_lengths = torch.tensor(self.region_lengths(MIDDLE), dtype=torch.int64, device=self.lengths.device)

    def _reserve(self, region: str, slots: int) -> None:
        """Grow every buffer of `region` to at least `slots` slots (doubling), keeping its tokens."""
        for name, buffer in self.buffers.items():
            if self._region(name) == region and buffer.shape[2] < slots:
                self.buffers[name] = _with_capacity(buffer, _grown(buffer.shape[2], slots))

    def _reserve_rings(self, new_tokens: int) -> None:
        """Regrow the rings too small for a call of `new_tokens`: each slot of the larger ring takes
        its token from the old one (tokens the old ring no longer held are older than any query sees)."""
        for name, buffer in self.buffers.items():
            if self._region(name) != RING:
                continue
            capacity = self.ring_capacity(entry_layer(name), new_tokens)
            if buffer.shape[2] < capacity:
                self.buffers[name] = _take_tokens(buffer, _ring_sources(self.lengths, capacity) % buffer.shape[2])


def _grown(capacity: int, needed: int) -> int:
    """Capacity for `needed` slots: doubled from `capacity` (at least MIN_CAPACITY) until it fits."""
    capacity = max(capacity, MIN_CAPACITY)
    while capacity < needed:
        capacity *= 2
    return capacity


def _with_capacity(tokens: torch.Tensor, capacity: int) -> torch.Tensor:
    """`tokens` (B, H, T, w) at the front of a new buffer of `capacity` slots, the others zero: a
    reader that masks slots past a row's count instead of cutting them (the ONNX decode attends
    over the whole capacity) multiplies them by 0, which uninitialized NaNs would survive."""
    batch, heads, count, width = tokens.shape
    buffer = tokens.new_zeros(batch, heads, capacity, width)
    buffer[:, :, :count] = tokens
    return buffer


def _ring_sources(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, capacity): the token each slot of a ring of `capacity` takes, token 0 where none is yet
    (a finite value no query reads)."""
    return ring_tokens(lengths, capacity).clamp(min=0)


def _take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, w) gathered along tokens by a per-row index (B, N): (B, H, N, w)."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
