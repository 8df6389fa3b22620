"""Running an exported folder with stock onnxruntime: no kvcompile ops, no plugin.

`generate(folder, input_ids)` decodes greedily; `load_sessions` and `run_program` are its pieces,
one call of a program at a time. The folder is what `kvcompile.export.onnx.export_onnx` writes:
`prefill.onnx`, `decode.onnx` and `manifest.json`, whose `prefill` / `decode` entries name each
file's inputs and outputs in order (the calling convention of kvcompile/program.py: the prefill
takes only the tokens, the decode also `past_{entry}` for each cache entry; both return `logits`
and `present_{entry}`). The loop is the runtime's: feed every written entry back as the next past.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kvcompile.program import LOGITS, TOKEN_INPUTS, Signature, past, present
from kvcompile.runtime import eos_token_ids

# The folder's files, shared with the exporter.
MANIFEST = "manifest.json"
PREFILL, DECODE = "prefill.onnx", "decode.onnx"
MANIFEST_FORMAT = 1


def generate(
    path: str | Path,
    input_ids,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    providers: Sequence[str] | None = None,
) -> torch.Tensor:
    """Greedy continuation with onnxruntime; returns prompt and new tokens, (B, S + new), like
    `TransformedModel.generate(..., do_sample=False)` (EOS from the manifest unless given; rows
    that emitted it keep emitting it until every row is done). Providers: CUDA when onnxruntime
    has it, else CPU."""
    prefill, decode, manifest = load_sessions(path, providers)
    tokens = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    eos = np.array(manifest["eos_token_id"] if eos_token_id is None else eos_token_ids(eos_token_id), dtype=np.int64)
    batch, length = tokens.shape
    logits, entries = run_program(prefill, manifest["prefill"], tokens, 0, {})
    done = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(-1).astype(np.int64)
        if eos.size:
            next_token = np.where(done, eos[0], next_token)
            done |= np.isin(next_token, eos)
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        if done.all() or step == max_new_tokens - 1:
            break
        logits, entries = run_program(decode, manifest["decode"], next_token[:, None], length + step, entries)
    return torch.from_numpy(tokens)


def load_sessions(path: str | Path, providers: Sequence[str] | None = None):
    """(prefill session, decode session, manifest) of an exported folder."""
    import onnxruntime as ort

    folder = Path(path)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{folder / MANIFEST}: manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sessions = [ort.InferenceSession(str(folder / manifest[phase]["file"]), providers=list(providers))
                for phase in ("prefill", "decode")]
    return sessions[0], sessions[1], manifest


def manifest_signature(names: dict) -> Signature:
    """The calling convention of one of the manifest's programs (`manifest["decode"]`, ...)."""
    return Signature(inputs=list(names["inputs"]), outputs=list(names["outputs"]))


def run_program(
    session, names: dict, input_ids: np.ndarray, start: int, entries: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call of an exported program (`names`: its manifest entry) on tokens at positions
    start.., reading the cache entries it takes from `entries`: (logits, the entries it writes),
    as `kvcompile.program.call_program`."""
    sig = manifest_signature(names)
    batch, seq = input_ids.shape
    feeds = dict(zip(TOKEN_INPUTS, (input_ids, _positions(batch, start, seq))))
    missing = [entry for entry in sig.cache_inputs if entry not in entries]
    if missing:
        raise KeyError(f"the program reads cache entries {missing}, which were not given")
    feeds.update({past(entry): entries[entry] for entry in sig.cache_inputs})
    outputs = dict(zip(sig.outputs, session.run(sig.outputs, feeds)))
    return outputs[LOGITS], {entry: outputs[present(entry)] for entry in sig.cache_outputs}


def _positions(batch: int, start: int, length: int) -> np.ndarray:
    """position_ids as the runtime builds them: start..start+length-1 for every row."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy()
