"""Test setup: 8 fake CPU devices (set before jax starts) for the data-parallel tests."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data folder with scikit-learn's digits prepared, shared by every test module."""
    from jaxmerge.datasets import prepare

    directory = tmp_path_factory.mktemp("tfds")
    prepare.prepare("sklearn_digits", str(directory))
    return directory
