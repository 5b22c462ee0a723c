"""What `pip install .` puts into a user's site-packages: one import name, `tierbatch`, and every file
the installed product reads at run time (migrations, the demo's sample data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy, so the build's own folders (build/, *.egg-info) never land in the checkout
    source = tmp_path_factory.mktemp("source") / "tierbatch"
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", ".tierbatch", "__pycache__", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True)
    [built] = out.glob("tierbatch-*.whl")
    yield built


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tierbatch"}
    # the folders kept at the repository's top level are inside the package, with the files read at run time
    for needed in ("tierbatch/api/main.py", "tierbatch/worker/app.py", "tierbatch/migrations/env.py",
                   "tierbatch/migrations/script.py.mako", "tierbatch/migrations/versions/0001_initial_schema.py",
                   "tierbatch/cli/samples/support_tickets.csv"):
        assert needed in names
    assert not any(name.startswith("tierbatch/tests/") for name in names)


def test_the_wheel_serves_the_dashboard_without_the_checkout(wheel: Path) -> None:
    """Every template and static file the dashboard reads, Chart.js and its licence among them."""
    names = set(zipfile.ZipFile(wheel).namelist())
    dashboard = ROOT / "api" / "dashboard"
    shipped = [p.relative_to(dashboard).as_posix() for p in dashboard.rglob("*")
               if p.is_file() and p.parent.name in ("templates", "static")]
    assert {"static/chart.umd.min.js", "static/chart.js-LICENSE.md", "static/dashboard.js", "static/dashboard.css",
            "templates/base.html", "templates/overview.html"} <= set(shipped)
    missing = [name for name in shipped if f"tierbatch/api/dashboard/{name}" not in names]
    assert missing == []
    chart = zipfile.ZipFile(wheel).read("tierbatch/api/dashboard/static/chart.umd.min.js")
    assert b"Chart.js v4" in chart[:200] and b"MIT" in chart[:200]


def test_a_clean_environment_imports_tierbatch_and_nothing_else(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    before = set(Path(site).iterdir())
    # --no-deps: the point is what this wheel adds; its dependencies are other projects' names
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    added = {p.name for p in set(Path(site).iterdir()) - before}
    assert {name for name in added if not name.endswith(".dist-info")} == {"tierbatch"}

    # run away from the checkout, so its folders cannot be found on sys.path
    def probe(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True)

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert probe("import tierbatch; print(tierbatch.__version__)").stdout.strip() == declared
    for name in ("api", "worker", "core", "cli", "simulator", "migrations"):
        failed = probe(f"import {name}")
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr, name
