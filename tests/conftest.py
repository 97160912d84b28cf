"""Test session set-up: 8 simulated CPU devices, LLVM at optimisation level 0, and the
repository root on sys.path.

XLA_FLAGS must be set before jax is first imported, which is why it is done here. Tests that
need one device simply use the default device; multi-device tests build meshes over all 8.
The suite's time is mostly XLA compiling the models' gradients; with LLVM's optimisations off
the whole model compiles about a third faster (152 s -> 96 s on one core of a 2-core machine) and its programs
run a little slower. The tests check values, not speed, and XLA's HLO passes (fusion, sharding)
are the same; subprocesses that set their own XLA_FLAGS take these
(`test_train_command.environment`).

The session, its pytest-xdist workers and the training commands they start share one
persistent compilation cache, in a directory made for the session and removed after it: a
program compiled once is not compiled again, as a model's initialisers (run op by op, the same
shapes in every init) or a train step a test compiles and a `python -m mmi_jax.train`
subprocess compiles again.
"""

import atexit
import os
import shutil
import sys
import tempfile

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
