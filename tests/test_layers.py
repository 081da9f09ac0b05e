"""The layers of pyproject.toml's import-linter contracts hold: the orchestrator (CLI, runner, planner,
benches) imports the stages, the stages import the core, never the other way; stages never import
each other. A wrong-direction import fails here, naming the chain."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout
