"""Files a later run reads back (plans, calibration checkpoints, reports): written atomically, read
back whole or refused by name.

A store of several files (a plan's `plan.json` and `tensors.safetensors`) writes its data files
first and its JSON last, each replacing the old file in one rename; the JSON records the SHA-256 of
the data it goes with. Interrupted anywhere, a store holds either its old files, or the new data
beside the old JSON, whose digest no longer matches: `read_tensors` refuses that pair by name
instead of loading half of each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part: written to a sibling, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def directory_replaced_atomically(path: Path, marker: str) -> Iterator[Path]:
    """Yield an empty sibling directory to write into; when the block ends without error it takes
    the place of `path` (renames: readers see the old directory or the new one, never a mix), and
    on error it is removed and `path` left as it was. An existing `path` must be empty or hold
    `marker` (an earlier write of the same kind): anything else is refused, never replaced."""
    path = Path(path)
    check_replaceable_directory(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_replaceable_directory(path: Path, marker: str) -> None:
    """Raise FileExistsError unless `path` is absent, an empty directory or one holding `marker`."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    if any(path.iterdir()) and not (path / marker).is_file():
        raise FileExistsError(f"{path}: a non-empty directory without {marker}; refusing to replace it")


def write_json(path: Path, document: Any) -> None:
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """The safetensors serialization of `tensors` and its SHA-256 (hex), for `write_atomically`."""
    data = tensors_to_bytes(tensors)
    return data, hashlib.sha256(data).hexdigest()


def read_json(path: Path, error: type[Exception]) -> Any:
    """The JSON document in regular file `path`; `error` naming the file if it is not one."""
    try:
        return json.loads(_read_regular(path, error))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from err


def read_tensors(path: Path, sha256: str | None, error: type[Exception]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`, checked against the `sha256` recorded with them (None:
    unchecked); `error` naming the file when it is missing, not a regular file, changed or broken."""
    data = _read_regular(path, error)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise error(f"{path}: its content is not the one recorded beside it (SHA-256 mismatch): it was edited, "
                    "or written by another save that did not finish")
    try:
        return tensors_from_bytes(data)
    except SafetensorError as err:
        raise error(f"{path}: not a readable safetensors file ({err})") from err


def _read_regular(path: Path, error: type[Exception]) -> bytes:
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise error(f"{path}: not a regular file")
    return path.read_bytes()


def weights_fingerprint(module: torch.nn.Module, sampled: int = 4, values: int = 4096) -> str:
    """A short hash telling one model's weights from another's of the same shape, cheap at any
    size: every parameter's name and shape, and `values` evenly spaced values of `sampled` of them."""
    params = sorted(module.named_parameters())
    digest = hashlib.sha256(json.dumps([(name, list(p.shape)) for name, p in params]).encode())
    for index in sorted({i * (len(params) - 1) // max(sampled - 1, 1) for i in range(sampled)} if params else ()):
        flat = params[index][1].detach().flatten()
        digest.update(flat[:: max(1, flat.numel() // values)][:values].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
