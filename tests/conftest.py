"""Test session set-up: 8 simulated CPU devices, LLVM at optimisation level 0, and the
repository root on sys.path.

XLA_FLAGS must be set before jax is first imported, which is why it is done here. Tests that
need one device simply use the default device; multi-device tests build meshes over all 8.
The suite's time is mostly XLA compiling the models' gradients; with LLVM's optimisations off
they compile much faster and run a little slower (experiments/PERFORMANCE.md). The tests
check values, not speed, and XLA's HLO passes (fusion, sharding) are the same; subprocesses
that set their own XLA_FLAGS take these (`test_train_command.environment`).

The session, its pytest-xdist workers and the training commands they start share one
persistent compilation cache, in a directory made for the session and removed after it: a
program compiled once is not compiled again by a process with the same devices, as a model's
initialisers (run op by op, the same shapes in every init) or the train step of a training
command that a later one runs again. (JAX keys the cache by the process's devices, and a
multi-process program by the process: there each process compiles its own.)
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                  "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "").split()
_names = {flag.split("=")[0] for flag in _flags}
os.environ["XLA_FLAGS"] = " ".join(_flags + [flag for flag in TEST_XLA_FLAGS
                                             if flag.split("=")[0] not in _names])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Made by the first process (pytest itself); its workers inherit the variable.
if "MMI_JAX_TEST_COMPILATION_CACHE" not in os.environ:
  os.environ["MMI_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="mmi_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["MMI_JAX_TEST_COMPILATION_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MMI_JAX_TEST_COMPILATION_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (_ROOT, os.path.join(_ROOT, "tests")):
  if path not in sys.path:
    sys.path.insert(0, path)


# The groups that span modules hold the longest work (training commands, trained states):
# they are handed out first, so that both workers finish together.
FIRST_GROUPS = ("train_command", "whole_model", "text_only_model")


def pytest_configure(config):
  """pytest-xdist hands out groups in the order of the tests (`FIRST_GROUPS` first), not
  sorted by their number of tests (its `--no-loadscope-reorder`)."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist names each test's group
def pytest_collection_modifyitems(items):
  """A test without a pytest-xdist group joins its module's (`--dist loadgroup`): one worker
  runs a module's tests, so that its fixtures and compiled programs are made once. Groups
  named in the tests (`xdist_group`) span modules that share a trained state; they come
  first."""
  def group(item):
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker else item.module.__name__

  for item in items:
    if not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
  rank = {name: index for index, name in enumerate(FIRST_GROUPS)}
  items.sort(key=lambda item: rank.get(group(item), len(FIRST_GROUPS)))
