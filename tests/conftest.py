"""Test configuration: several host devices for sharding tests; float64 on demand."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Enables float64 for one test."""
  with jax.enable_x64(True):
    yield
