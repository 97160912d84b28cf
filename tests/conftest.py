"""Test session set-up: 8 simulated CPU devices, LLVM at optimisation level 0, and the
repository root on sys.path.

XLA_FLAGS must be set before jax is first imported, which is why it is done here. Tests that
need one device simply use the default device; multi-device tests build meshes over all 8.
The suite's time is mostly XLA compiling the models' gradients; with LLVM's optimisations off
the whole model compiles about a third faster (152 s -> 96 s on one core of a 2-core machine) and its programs
run a little slower. The tests check values, not speed, and XLA's HLO passes (fusion, sharding)
are the same; subprocesses that set their own XLA_FLAGS take these
(`test_train_command.environment`).
"""

import os
import sys

TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                  "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "").split()
_names = {flag.split("=")[0] for flag in _flags}
os.environ["XLA_FLAGS"] = " ".join(_flags + [flag for flag in TEST_XLA_FLAGS
                                             if flag.split("=")[0] not in _names])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (_ROOT, os.path.join(_ROOT, "tests")):
  if path not in sys.path:
    sys.path.insert(0, path)
