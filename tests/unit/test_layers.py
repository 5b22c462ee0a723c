"""The dependency rules of docs/architecture.md, as `[tool.importlinter]` in pyproject.toml states them.

`lint-imports` checks every contract against the real import graph. The second test proves the checker
sees that graph: a planted contract the tree breaks (the schema may not import the foundation, which it
does, rightly) must be reported broken, naming the import."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def run_lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)


def test_every_dependency_contract_is_kept() -> None:
    result = run_lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["id"] for c in contracts} == {"layers", "http-at-the-edge", "one-sdk-boundary"}
    assert result.stdout.count(" KEPT") == len(contracts)


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[tool.importlinter]\nroot_package = "tierbatch"\n\n'
                      '[[tool.importlinter.contracts]]\nname = "planted"\ntype = "forbidden"\n'
                      'source_modules = ["tierbatch.db"]\nforbidden_modules = ["tierbatch.base"]\n')
    result = run_lint_imports(config)
    assert result.returncode != 0
    assert "planted BROKEN" in result.stdout
    assert "tierbatch.db.models.base -> tierbatch.base" in result.stdout
