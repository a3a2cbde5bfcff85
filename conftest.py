"""Test-wide XLA flags, each kept where XLA_FLAGS already sets it.

* 8 simulated CPU devices, so multi-device code is exercised.
* Backend (LLVM) optimization level 0. The suite's time goes mostly to
  compiling many small programs, which level 0 makes cheaper: on this project's
  2-core CPU the 24 slowest tests took 367 s instead of 520 s (one run each, one
  after the other, both beside the same two training runs). No test times
  code, and the tests of fusion and in-place donation pass at both levels.
  Level 0 does not contract ``a * b + c`` into a fused
  multiply-add, which the correctly rounded division needs: tests marked
  ``fused_multiply_add`` run in a child process at XLA's default level. To run
  everything at the default level: ``XLA_FLAGS=--xla_backend_optimization_level=2``.
"""

import os
import subprocess
import sys

import pytest

_OPT_LEVEL = "--xla_backend_optimization_level"
_DEFAULTS = {"--xla_force_host_platform_device_count": "8", _OPT_LEVEL: "0"}

_flags = os.environ.get("XLA_FLAGS", "").split()
for _name, _value in _DEFAULTS.items():
  if not any(f.split("=")[0] == _name for f in _flags):
    _flags.append(f"{_name}={_value}")
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """Runs a ``fused_multiply_add`` test in a child pytest at XLA's default level."""
  if (pyfuncitem.get_closest_marker("fused_multiply_add") is None
      or f"{_OPT_LEVEL}=0" not in _flags):
    return None
  child_flags = [f for f in _flags if f.split("=")[0] != _OPT_LEVEL] + [f"{_OPT_LEVEL}=2"]
  env = dict(os.environ, XLA_FLAGS=" ".join(child_flags))
  child = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       pyfuncitem.nodeid], cwd=pyfuncitem.config.rootpath, env=env,
      capture_output=True, text=True)
  if child.returncode != 0:
    pytest.fail(f"{pyfuncitem.nodeid} failed at {_OPT_LEVEL}=2:\n{child.stdout[-6000:]}",
                pytrace=False)
  return True
