"""Test configuration: 8 simulated CPU devices, float64 available, deterministic seeds."""

import os

# BLAS/LAPACK thread pools oversubscribe the 2 cores that the test workers share (a small SVD
# took seconds instead of milliseconds): one thread each, before numpy loads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite is compile-bound: most tests run small programs once. LLVM's optimisation of the
# CPU code is most of a compilation's time (a ResNet-18 test: 32 s at the default level, 12 s
# at 0), while XLA's HLO passes, which fix the programs' structure and what the tests check,
# run the same at every level. Subprocesses (notebooks, SIGKILL and multi-process runs)
# inherit the setting. Set the level in XLA_FLAGS to override it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if _backend_ok() else False
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def _backend_ok():
    try:
        jax.devices()
        return True
    except RuntimeError:
        return False


@pytest.fixture
def rng():
    """A numpy Generator seeded from the test's name: fresh data per test, reproducible."""
    import zlib

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode())
    return np.random.default_rng(seed)


@pytest.fixture
def compiles():
    """The backend compilations run during the test, as a growing list (read its length)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
