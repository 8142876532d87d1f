"""Test setup: 8 forced CPU devices (so sharding is real), headless MuJoCo, fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

pytest_plugins = ["tests.data_fixtures", "tests.policy_fixtures", "tests.gcs_emulator"]
