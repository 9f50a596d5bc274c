"""Test configuration: 8 host devices in the test processes for the sharding
tests (subprocesses get one unless a test asks for more); float64 on demand."""

import os

# Must be set before jax initialises its backends.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("XLA_FLAGS", _DEVICES_FLAG)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.devices()  # Initialises the backends now, with the flag above.
# Commands the tests start (launch.train, notebooks) see one device, as on a
# laptop, unless a test sets XLA_FLAGS for them.
if os.environ.get("XLA_FLAGS") == _DEVICES_FLAG:
  del os.environ["XLA_FLAGS"]


@pytest.fixture
def x64():
  """Enables float64 for one test."""
  with jax.enable_x64(True):
    yield
