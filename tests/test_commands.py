"""The commands as a newcomer meets them: `--help` answers with the usage and the flags (exit
0), and a mistake in the command line or the config ends in one line naming it (exit 2),
before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "--config=configs/demo.py"


@pytest.mark.parametrize("module, arguments, exit_code, message", [
    ("mmi_jax.train", ["--help"], 0, "--mode=eval [--step=N]"),
    ("mmi_jax.train", [DEMO], 2, "error: --workdir=DIR is required"),
    ("mmi_jax.train", ["--workdir=WORKDIR"], 2, "error: --config=FILE is required"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.eval_only=True"], 2,
     "error: --config.eval_only: the config has no setting 'eval_only'"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.stepz=3"], 2,
     "error: --config.train.stepz: the config has no setting 'stepz' (Did you mean " + '"steps"'),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.steps=many"], 2,
     "error: flag --config.train.steps=many: invalid literal for int()"),
    ("mmi_jax.train", ["--config=configs/no_such_config.py", "--workdir=WORKDIR"], 2,
     "No such file or directory: 'configs/no_such_config.py'"),
    ("mmi_jax.train", ["--config=configs/demo.py:large", "--workdir=WORKDIR"], 2,
     "unknown variant 'large' (known: text_only)"),
    ("mmi_jax.train", [DEMO, "--wrkdir=WORKDIR"], 2,
     "error: Unknown command line flag 'wrkdir'. Did you mean: workdir ?"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--step=3"], 2,
     "error: --step is for --mode=eval"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--mode=eval"], 2,
     "error: --workdir: WORKDIR/checkpoints does not exist (no training run here)"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.steps=4"], 2,
     "error: train.warmup_steps 40 must be below train.steps 4"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.keep_checkpoints=0"], 2,
     "error: train.keep_checkpoints must be an integer >= 1, got 0"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.log_every=0",
                       "--config.data.batch_size=-2"], 2,
     "error: train.log_every must be an integer >= 1, got 0; data.batch_size must be an "
     "integer >= 1, got -2"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.data.sequence_length=8"], 2,
     "error: data: the first training batch holds no document, every one was skipped"),
    ("mmi_jax.train", [DEMO, "--workdir=WORKDIR", "--config.train.extensions=('no.Such',)"], 2,
     "error: config.train.extensions: 'no.Such' cannot be imported"),
    ("mmi_jax.convert", ["--help"], 0, "jax-to-release SRC DST --config=... [--step=N]"),
    ("mmi_jax.convert", [], 2, "error: the first argument is the command, one of "
     "release-to-jax, jax-to-release, export, count; got none"),
    ("mmi_jax.convert", ["export", "WORKDIR"], 2, "error: export takes 2 paths (SRC DST), got 1"),
    ("mmi_jax.convert", ["export", "WORKDIR", "OUT"], 2, "error: --config=FILE is required"),
    ("mmi_jax.convert", ["export", "WORKDIR", "OUT", DEMO], 2,
     "error: SRC WORKDIR does not exist"),
])
def test_a_command_answers_help_and_names_a_mistake_in_one_line(tmp_path, module, arguments,
                                                                exit_code, message):
  workdir = str(tmp_path / "run")
  arguments = [argument.replace("WORKDIR", workdir) for argument in arguments]
  done = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  message = message.replace("WORKDIR", workdir)
  assert done.returncode == exit_code, done.stdout[-2000:] + done.stderr[-2000:]
  if exit_code == 0:
    assert message in done.stdout and "flags:" in done.stdout
  else:
    # At most the line a job starts with (the checks of the config's extensions come after).
    assert done.stdout.count("\n") <= 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith(f"python -m {module}: error: ") and message in done.stderr
  # Nothing written, but for the lock of a run that held the workdir before it stopped.
  assert not os.path.exists(workdir) or os.listdir(workdir) == ["run.lock"]
