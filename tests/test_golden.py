"""Golden printouts of a one-layer Llama's program after each pass.

Regenerate after an intended change with:  KVCOMPILE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
and read the diff. Node names come from torch.export, so the files are tied to the torch and
transformers versions in their first line (the ones constraints.txt pins for CI).
"""

import os
from pathlib import Path

import pytest
import torch
import transformers

from tests.programs import GOLDEN_PLAN, merged_programs, pipeline
from tests.tiny_models import make_tiny_model

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
VERSIONS = f"# torch {torch.__version__.split('+')[0]}, transformers {transformers.__version__}"
UPDATE = os.environ.get("KVCOMPILE_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def programs():
    model = make_tiny_model("llama", num_layers=1)
    return {**pipeline(model, GOLDEN_PLAN), **merged_programs(model)}


def render(gm) -> str:
    body = "\n".join(line.rstrip() for line in gm.code.strip().splitlines())
    return f"{VERSIONS}\n{body}\n"


STAGES = ["captured", "canonicalize_attention", "merge_kv_heads.commute", "merge_kv_heads.post", "prune_k_channels.prefill",
          "prune_k_channels.decode"]


@pytest.mark.parametrize("stage", STAGES)
def test_program_matches_golden(programs, stage):
    path = GOLDEN / f"{stage}.py.txt"
    text = render(programs[stage])
    if UPDATE:
        path.write_text(text)
    expected = path.read_text()
    if expected.splitlines()[0] != VERSIONS:
        pytest.skip(f"{path.name} was made with {expected.splitlines()[0][2:]}; this is {VERSIONS[2:]}")
    assert text == expected, f"{stage} changed; if intended, regenerate (see this file's docstring) and review the diff"
