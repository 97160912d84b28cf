"""Test session set-up: 8 simulated CPU devices, and the repository root on sys.path.

XLA_FLAGS must be set before jax is first imported, which is why it is done here. Tests that
need one device simply use the default device; multi-device tests build meshes over all 8.
"""

import os
import sys

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (_ROOT, os.path.join(_ROOT, "tests")):
  if path not in sys.path:
    sys.path.insert(0, path)
