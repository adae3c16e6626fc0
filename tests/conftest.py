"""Test session setup: 8 fake CPU devices for the mesh/sharding tests, a private cache dir."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
  devs = jax.devices()
  if len(devs) < 8:
    pytest.skip("needs 8 (fake) devices")
  return devs[:8]
