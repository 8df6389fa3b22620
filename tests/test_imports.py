"""Importing from a checkout: the repository root on sys.path (`python -m ...` or a script run
from it) puts its `kernels/` directory where a top-level `kernels` package would be, a name
transformers probes for (the Hub's kernels package) by importing it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_then_kvcompile_import_from_the_repository_root():
    code = ("from transformers import LlamaForCausalLM\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import kvcompile, torch\n"
            "assert not is_kernels_available()\n"
            "assert torch.ops.kvcompile.windowed_attention is not None\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
