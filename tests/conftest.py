"""Test configuration: several host devices for sharding tests, float64 on demand."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs a test in float32 and in float64 (x64 enabled for that test only)."""
  if request.param == "float64":
    with jax.enable_x64(True):
      yield request.param
  else:
    yield request.param


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield
