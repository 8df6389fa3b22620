"""Importing from a checkout: the repository root on sys.path (`python -m ...` or a script run
from it) puts its `kernels/` directory where a top-level `kernels` package would be, a name
transformers probes for and imports (the Hub's kernels package, a dependency of transformers from
5.25 on)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
from transformers import LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available
import kvcompile, torch
assert torch.ops.kvcompile.windowed_attention is not None
try:
    import kernels
    where = kernels.__file__
except ImportError:
    where = None
print(is_kernels_available(), where)
"""


def _probe(cwd: Path) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    available, where = result.stdout.split()
    return available, where


def test_transformers_and_kvcompile_import_from_the_repository_root_as_from_elsewhere(tmp_path):
    """From the root, `kernels` is the installed Hub package when there is one, else an empty module
    that transformers counts as absent: transformers sees what it sees from any other directory."""
    available, where = _probe(ROOT)
    available_elsewhere, where_elsewhere = _probe(tmp_path)
    assert available == available_elsewhere
    if where_elsewhere == "None":
        assert Path(where) == ROOT / "kernels" / "__init__.py"
    else:
        assert where == where_elsewhere


def test_each_script_builds_its_command_line():
    """The scripts run on a GPU machine, outside the tests' other paths: each at least imports what
    it names and parses its options (from the root, as their docstrings run them)."""
    for script in sorted((ROOT / "scripts").glob("*.py")):
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, (script.name, result.stderr[-2000:])
