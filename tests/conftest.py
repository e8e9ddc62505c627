"""Test setup: 8 fake CPU devices (set before jax starts) for the data-parallel tests."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# One XLA compilation cache for the whole session, shared by the xdist workers and the command
# subprocesses (set here, before they start, so they inherit it): the tests build the same tiny
# train steps and merges many times, and a compile found in the cache is about a third of the
# suite's CPU time saved. A fresh folder per session, so no run reads another run's programs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # True in the process that made it
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmerge-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session, exitstatus):
    """The session's compilation cache goes with it (removed by the process that made it)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data folder with scikit-learn's digits prepared, shared by every test module."""
    from jaxmerge.datasets import prepare

    directory = tmp_path_factory.mktemp("tfds")
    prepare.prepare("sklearn_digits", str(directory))
    return directory


@pytest.fixture(scope="session")
def digit_runs(tmp_path_factory):
    """Two LoRA runs of 10 steps on one random base: digit classes and digit boxes
    (WORKDIR/adapters/digits, WORKDIR/adapters/digit_box), and their TFDS data folder."""
    from jaxmerge import training
    from jaxmerge.datasets import prepare
    from tests.tiny import tiny_config

    data_dir = tmp_path_factory.mktemp("digit_tfds")
    for name in ("sklearn_digits", "digit_box"):
        prepare.prepare(name, str(data_dir))
    workdir = tmp_path_factory.mktemp("digit_work")
    for task in ("digits", "digit_box"):
        config = tiny_config(data_dir, task=task, steps=10, checkpoint_every=10, log_every=5)
        training.train_and_evaluate(config, str(workdir))
    return [str(workdir / "adapters" / task) for task in ("digits", "digit_box")], data_dir
