"""The packages' layering (`.importlinter`): it holds, and import-linter refuses a violation."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  """import-linter on the tree at `root` (its packages first on the path)."""
  environment = dict(os.environ, PYTHONPATH=str(root))
  return subprocess.run([sys.executable, "-c", LINT], cwd=root, capture_output=True, text=True,
                        env=environment, timeout=300)


def test_the_packages_keep_their_layers():
  done = lint_imports(ROOT)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("mmi_jax/models/mm_interleaved.py", "from mmi_jax.batch import validate",
     "mmi_jax.models is not allowed to import mmi_jax.batch"),
    ("mmi_jax/train/optimizer.py", "from mmi_jax.demo import stand_ins",
     "mmi_jax.train is not allowed to import mmi_jax.demo"),
    ("configs/tiny.py", "import mmi_jax.models",
     "configs is not allowed to import mmi_jax"),
])
def test_an_import_against_the_layers_is_refused(tmp_path, module, line, broken):
  for name in ("mmi_jax", "configs"):
    shutil.copytree(ROOT / name, tmp_path / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
  path = tmp_path / module
  source = path.read_text().splitlines(keepends=True)
  # After the module's docstring and `from __future__` line, as a real import would be.
  after = next(i for i, text in enumerate(source) if text.startswith("from __future__")
               or text.startswith("import ml_collections")) + 1
  path.write_text("".join(source[:after] + [line + "\n"] + source[after:]))
  done = lint_imports(tmp_path)
  assert done.returncode != 0
  assert broken in done.stdout, done.stdout
