"""A full disk during a checkpoint save: one line that says so, exit status 2, the run resumes
once there is space. Needs a small tmpfs (root with mount rights, as in CI); skipped, with the
reason printed, where `mount` is refused."""

import os
import subprocess
import sys
import uuid

import pytest

from jaxmerge.datasets import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.variant=mu/4",
    "--config.model.image_size=8",
    *(f"--config.model.overrides.{k}=0" for k in ("depth", "width", "mlp_dim", "num_heads")),
    "--config.head.hidden=16",
    "--config.batch_size=16",
    "--config.steps=20",
    "--config.warmup_steps=2",
    "--config.checkpoint_every=10",
    "--config.log_every=5",
]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KB tmpfs: room for the run's logs, not for its first checkpoint."""
    mount_point = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow  # end to end through subprocesses: CI runs it in its own step
def test_disk_full_during_a_save_is_one_line_and_the_run_resumes(small_disk, tmp_path):
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("sklearn_digits", data_dir)
    command = [
        sys.executable, "-m", "jaxmerge", "train",
        "--config", "configs/adapter.py:task=digits", *TINY,
        f"--config.data_dir={data_dir}", f"--workdir={small_disk / 'w'}",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoints/10 could not be written: disk full" in errors[0]
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr
    assert len(full.stderr.splitlines()) <= 4, full.stderr  # progress, TensorBoard, the error
    saved_aside = errors[0].rsplit("Orbax's own messages are in ", 1)[-1]
    assert os.path.isfile(saved_aside) and "RESOURCE_EXHAUSTED" in open(saved_aside).read()
    os.remove(saved_aside)

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(small_disk / "w" / "adapters" / "digits" / "checkpoints")) == [
        "10", "20"
    ]  # fmt: skip
