"""Test configuration: 8 host devices in the test processes for the sharding
tests (subprocesses get one unless a test asks for more); float64 on demand;
XLA's quickest compile; one compilation cache for the whole session.

Most of the suite's time is XLA compiling. The tests check values and
compiled memory, which XLA's HLO passes and buffer assignment decide, not the
speed of the machine code, so every process of the suite (and every command
it starts) has XLA's LLVM backend at its fastest-compiling level (as
`launch.plan` and the quick sweep have for shapes-only work). Measured on
CPU: the same compiled memory to the byte (lm_loss_weighting, T=4, L=512,
standard and mixflow: 2198507384 and 359181416 temp bytes), their compiles
66 s -> 41 s, and training steps as fast (600 sinusoid meta-steps 23.6 s ->
22.2 s; dots and convolutions are library calls).

The suite compiles many identical programs: a trainer rebuilt for a resume,
every ``python -m launch.train`` a test starts (SIGKILL and resume, workers,
several processes). JAX's persistent compilation cache, in a folder made for
this session (inherited by the pytest-xdist workers and by every command the
tests start; every program in it, however quick to compile) and removed at
its end, compiles each of them once. A cached
executable is the one XLA compiled for the same program and options, so
nothing a test checks changes; a run that sets ``JAX_COMPILATION_CACHE_DIR``
itself keeps its own.
"""

import os
import shutil
import tempfile

# Must be set before jax initialises its backends (and reads its config).
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
_TEST_FLAGS = f"{_DEVICES_FLAG} {_FAST_COMPILE_FLAGS}"
# Unset, or as this file leaves it for the commands the tests start (the
# pytest-xdist workers inherit it from the pytest process).
if os.environ.get("XLA_FLAGS", _FAST_COMPILE_FLAGS) == _FAST_COMPILE_FLAGS:
  os.environ["XLA_FLAGS"] = _TEST_FLAGS
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # the pytest process itself: the workers inherit the folder
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="metaflow-tests-jax-cache-")
  # Every program, not only those compiling for over a second (JAX's
  # default): at the fastest-compiling level most compile in less, and the
  # commands a test starts again and again (a SIGKILL and its resume)
  # compile the same ones (tests/test_resume.py: 99 s -> 80 s).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.devices()  # Initialises the backends now, with the flags above.
# Commands the tests start (launch.train, notebooks) see one device, as on a
# laptop, unless a test sets XLA_FLAGS for them.
if os.environ["XLA_FLAGS"] == _TEST_FLAGS:
  os.environ["XLA_FLAGS"] = _FAST_COMPILE_FLAGS


@pytest.fixture
def x64():
  """Enables float64 for one test."""
  with jax.enable_x64(True):
    yield


def pytest_collection_modifyitems(config, items):
  """The slow tests first (otherwise in file order): pytest-xdist hands the
  tests out in this order, so the last ones to start are short and neither
  worker idles long at the end while the other finishes a long test."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
