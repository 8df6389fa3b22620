"""Running an exported folder with stock onnxruntime: no kvcompile ops, no plugin.

`generate(folder, input_ids)` decodes greedily; `load(folder)` gives the `ExportedModel` it steps,
one program call at a time. The folder is what `kvcompile.export.onnx.export_onnx` writes:
`prefill.onnx` and `decode.onnx` (their weights in `weights.bin`), the plan (`plan/`) and
`manifest.json`, whose `prefill` / `decode` entries name each program's inputs and outputs in
order (the calling convention of kvcompile/program.py).

The cache is the PyTorch runtime's `CompressedKVCache` (cache.py), under the plan saved with the
export: the prefill's outputs are laid out by `write_prompt` (each row's real tokens, windows
split), and each decode call takes its index inputs from `prepare_call` and ends with `advance`,
which moves full windows' oldest tokens to the pruned middle. The decode program reads every
buffer as `past_X` and returns the ones it writes as `present_X`; both are bound to the same memory
(IOBinding on the buffers' own storage), so onnxruntime writes the new tokens in place. The cache
held is therefore the runtime's, byte for byte: same entries, same counts, same `nbytes`.

Files named by the manifest must be plain names inside the folder; token ids are checked
(integers, 0 <= id < vocabulary size) before onnxruntime sees them: it would read -1 as the last
row of the embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch

from kvcompile.cache import CompressedKVCache
from kvcompile.plan import ModelShape, Plan
from kvcompile.program import LOGITS, Signature, past, present
from kvcompile.runtime import (
    continuation_of,
    continuation_positions,
    eos_token_ids,
    last_real_index,
    padding_mask,
    prompt_positions_and_mask,
)
from kvcompile.stores import read_json

# The folder's files, shared with the exporter.
MANIFEST = "manifest.json"
PREFILL, DECODE, WEIGHTS, PLAN = "prefill.onnx", "decode.onnx", "weights.bin", "plan"
MANIFEST_FORMAT = 2
_FILES = {"prefill": PREFILL, "decode": DECODE, "weights": WEIGHTS, "plan": PLAN}


class ExportFolderError(ValueError):
    """An export folder that cannot be run as it is (names the file and the field)."""


class ExportedModel:
    """An export folder's programs in onnxruntime sessions, with its plan and manifest."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(path)
        self.manifest = read_json(self.folder / MANIFEST, ExportFolderError)
        where = self.folder / MANIFEST
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ExportFolderError(f"{where}: manifest format {self.manifest.get('format')!r}, expected "
                                    f"{MANIFEST_FORMAT} (export the model again)")
        files = {key: _file_in(self.folder, self.manifest, key) for key in _FILES}
        self.plan = Plan.load(files["plan"])
        if self.plan.fingerprint() != self.manifest["plan"].get("fingerprint"):
            raise ExportFolderError(f"{where}: field plan.fingerprint does not match the plan in {files['plan']}")
        self.shape = ModelShape(**self.manifest["shape"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.signatures = {phase: Signature(list(self.manifest[phase]["inputs"]), list(self.manifest[phase]["outputs"]))
                           for phase in ("prefill", "decode")}
        providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {phase: ort.InferenceSession(str(files[phase]), providers=providers)
                         for phase in ("prefill", "decode")}
        self.decode_call = DecodeCall(self.sessions["decode"], self.signatures["decode"])

    def prefill(self, input_ids, attention_mask=None, max_cache_len: int | None = None
                ) -> tuple[torch.Tensor, CompressedKVCache]:  # fmt: skip
        """Logits (B, S, V) of a prompt and the cache it leaves: `attention_mask` (B, S) marks real
        tokens (either side padded), as `TransformedModel`; `max_cache_len`: slots per row."""
        ids = check_token_ids(input_ids, self.vocab_size)
        batch, seq = ids.shape
        valid = padding_mask(None if attention_mask is None else torch.as_tensor(attention_mask), batch, seq, "cpu")
        positions, mask = prompt_positions_and_mask(valid)
        sig = self.signatures["prefill"]
        feeds = dict(zip(sig.inputs, (ids.numpy(), positions.numpy(), mask.numpy())))
        outputs = dict(zip(sig.outputs, self.sessions["prefill"].run(sig.outputs, feeds)))
        cache = CompressedKVCache(self.plan, self.shape)
        cache.write_prompt({entry: torch.from_numpy(outputs[present(entry)]) for entry in sig.cache_outputs},
                           None if bool(valid.all()) else valid, max_cache_len)
        return torch.from_numpy(outputs[LOGITS]), cache

    def decode(self, input_ids, cache: CompressedKVCache, attention_mask=None) -> torch.Tensor:
        """Logits (B, S, V) of `input_ids` continuing every row of `cache`, which they extend;
        `attention_mask` (B, P + S) may pad them anywhere, as `TransformedModel`'s."""
        ids = check_token_ids(input_ids, self.vocab_size)
        cache.check_written_by(self.plan, self.shape)
        if ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids has batch {ids.shape[0]}, the cache holds batch {cache.batch_size}")
        seq = ids.shape[1]
        padding = continuation_of(attention_mask, cache, seq)
        indices = cache.prepare_call(seq, padding.real)  # grows the buffers first where they would overflow
        values = {"input_ids": padding.left_padded(ids),
                  "position_ids": continuation_positions(cache.lengths, seq, padding.real), **indices}
        logits = padding.in_call_order(self.decode_call(values, cache.buffers))
        cache.advance(seq, padding.real)
        return logits


class DecodeCall:
    """Calls of an exported decode on cache buffers: tokens, positions and index inputs bound per
    call; each cache entry bound as `past_X` and, where the program writes it, as `present_X` too,
    on the buffer's own memory, so onnxruntime writes the new tokens into the buffer itself. A
    buffer is bound once and again only when the cache replaces it (growth): wrapping some hundred
    buffers for onnxruntime would cost milliseconds a step."""

    def __init__(self, session, signature: Signature):
        self.session, self.signature = session, signature
        self.binding = session.io_binding()
        self.binding.bind_output(LOGITS)  # first bound: first of get_outputs()
        self.written = {entry for entry in signature.cache_inputs if present(entry) in signature.outputs}
        self.bound: dict[str, tuple[torch.Tensor, object]] = {}  # entry -> (buffer, its OrtValue)

    def __call__(self, values: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of one call on `values` (tokens, positions, index inputs) and `buffers`
        (contiguous CPU tensors)."""
        import onnxruntime as ort

        arrays = {name: values[name].numpy() for name in ["input_ids", "position_ids", *self.signature.index_inputs]}
        for name, array in arrays.items():  # `arrays` keeps them alive until the run
            self.binding.bind_cpu_input(name, array)
        # unallocated again: after a run the binding holds the last logits, of the last call's shape
        self.binding.bind_output(LOGITS)
        for entry in self.signature.cache_inputs:
            buffer = buffers[entry]
            if entry in self.bound and self.bound[entry][0] is buffer:
                continue
            value = ort.OrtValue.ortvalue_from_numpy(buffer.numpy())  # the tensor's own memory
            self.binding.bind_ortvalue_input(past(entry), value)
            if entry in self.written:
                self.binding.bind_ortvalue_output(present(entry), value)  # written in place
            self.bound[entry] = (buffer, value)
        self.session.run_with_iobinding(self.binding)
        return torch.from_numpy(self.binding.get_outputs()[0].numpy())


def load(path: str | Path, providers: Sequence[str] | None = None) -> ExportedModel:
    """The export folder `path` ready to run (CPU unless `providers` says otherwise)."""
    return ExportedModel(path, providers)


def generate(
    path: str | Path | ExportedModel,
    input_ids,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    providers: Sequence[str] | None = None,
    attention_mask=None,
) -> torch.Tensor:
    """Greedy continuation with onnxruntime; returns prompt and new tokens, (B, S + new), like
    `TransformedModel.generate(..., do_sample=False)`: `attention_mask` marks a padded batch's
    real tokens, each row continuing from its last one; EOS from the manifest unless given, rows
    that emitted it keep emitting it until every row is done."""
    model = path if isinstance(path, ExportedModel) else load(path, providers)
    tokens = check_token_ids(input_ids, model.vocab_size)
    eos = torch.tensor(model.manifest["eos_token_id"] if eos_token_id is None else eos_token_ids(eos_token_id),
                       dtype=torch.int64)
    batch, seq = tokens.shape
    logits, cache = model.prefill(tokens, attention_mask, max_cache_len=seq + max_new_tokens)
    valid = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
    logits = logits[torch.arange(batch), last_real_index(valid, batch, seq, "cpu")]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1)
        if eos.numel():
            next_token = torch.where(done, eos[0], next_token)
            done |= torch.isin(next_token, eos)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode(next_token[:, None], cache)[:, -1]
    return tokens


def check_token_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """`input_ids` as a (B, S) int64 CPU tensor, or the error saying what is wrong with them: not
    integers (floats would be truncated), not 2-D, or an id outside [0, vocab_size)."""
    ids = input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else torch.from_numpy(np.asarray(input_ids))
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {tuple(ids.shape)}")
    outside = (ids < 0) | (ids >= vocab_size)
    if bool(outside.any()):
        row, column = (int(i) for i in outside.nonzero()[0])
        raise ValueError(f"input_ids[{row}, {column}] = {int(ids[row, column])} is not a token id: ids must lie in "
                         f"[0, {vocab_size}) (the vocabulary size)")
    return ids.to(torch.int64)


def _file_in(folder: Path, manifest: dict, key: str) -> Path:
    """The file the manifest's field `{key}.file` names: a plain name inside `folder`, which must exist."""
    name = manifest.get(key, {}).get("file") if isinstance(manifest.get(key), dict) else None
    where = f"{folder / MANIFEST}: field {key}.file"
    if not isinstance(name, str):
        raise ExportFolderError(f"{where} is missing or not a string")
    if name in ("", ".", "..") or PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise ExportFolderError(f"{where} = {name!r}: must name a file in the folder itself (no path, no '..')")
    path = folder / name
    if not path.exists():
        raise ExportFolderError(f"{where} = {name!r}: {path} does not exist")
    return path
