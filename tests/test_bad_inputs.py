"""Bad inputs, as tables: each case is one line with the message it must give (or the safe,
announced fallback it must take). Add the next case as one more row."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import checkpoint, lora, merging, run_lock, training
from jaxmerge.commands import train as train_command
from jaxmerge.models import vit
from tests.tiny import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = vit.ViT(**vit.variant("mu/4", image_size=8))
BASE = vit.init_params(MODEL, jax.random.key(0))
CONFIG = lora.LoraConfig(rank=2, targets=vit.TARGET_PRESETS["qv"])


def _adapter(seed: int):
    adapter = lora.init_adapter(jax.random.key(seed), BASE, CONFIG)
    return lora.map_targets(lambda n: {**n, "lora_b": n["lora_b"] + 0.1}, adapter)


def _poison(adapter, value):
    node = adapter["block_0"]["attention"]["value"]
    return lora.set_at(
        adapter, "block_0/attention/value", {**node, "lora_b": node["lora_b"].at[0, 0].set(value)}
    )


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("method", sorted(merging.METHODS))
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_merge_refuses_non_finite_adapters(method, value):
    """`ties`, `ties_delta` and `breadcrumbs` used to return finite values from NaN inputs."""
    adapters = [_adapter(1), _poison(_adapter(2), value)]
    params = {"density": 0.5} if "density" in merging.METHODS[method].params else {}
    message = r"adapters\[1\] target 'block_0/attention/value': lora_b holds NaN or inf"
    with pytest.raises(ValueError, match=message):
        merging.merge(adapters, method, key=jax.random.key(0), **params)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: merging.merge([_adapter(1), _adapter(2)], "cat", [1.0, np.nan]),
            r"weights: got \[1.0, nan\]; allowed: finite numbers",
        ),
        (
            lambda: merging.merge([_adapter(1)], "task_arithmetic", [1e10], scale=1e30),
            "merge result of 'task_arithmetic' target 'block_0/attention/query': delta holds NaN",
        ),
        (
            lambda: lora.fold_into_base(BASE, _poison(_adapter(1), np.nan)),
            "adapter target 'block_0/attention/value': lora_b holds NaN or inf",
        ),
        (
            lambda: lora.init_adapter(jax.random.key(0), BASE, lora.LoraConfig(rank=1000)),
            r"LoraConfig.rank: got 1000 for target 'block_0/attention/query'; allowed: at most min\(in, out\) = 32",
        ),
        (
            lambda: merging.merge([_adapter(1), _adapter(2)], "svd", svd_rank=1000),
            r"svd_rank: got 1000; allowed: at most 32 \(the largest adapted layer's smaller side",
        ),
        (
            lambda: merging.merge(
                [_adapter(1), _adapter(2)], "task_arithmetic", output="factored", rank=33
            ),
            r"rank: got 33; allowed: at most 32",
        ),
    ],
    ids=["nan weight", "overflowing result", "fold nan", "rank above width", "svd_rank", "rank"],
)
def test_bad_merge_and_adapter_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "block_7/attention/query",
            "adapter target 'block_7/attention/query' is not a layer of the base parameters",
        ),
        (
            "block_0/attention/qeury",
            "adapter target 'block_0/attention/qeury' is not a layer of the base parameters",
        ),
    ],
)
def test_apply_refuses_targets_the_base_lacks(path, message):
    """Today's behaviour it replaces: the plain ViT's output, without a word."""
    adapter = lora.set_at(_adapter(1), path, _adapter(1)["block_0"]["attention"]["query"])
    images = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=message):
        MODEL.apply({"params": BASE, "lora": adapter}, images)
    with pytest.raises(ValueError, match=message):  # under jit: checked once, at trace time
        jax.jit(lambda a: MODEL.apply({"params": BASE, "lora": a}, images))(adapter)


def test_apply_refuses_an_update_of_the_wrong_shape():
    node = {"delta": jnp.zeros((5, 32))}
    adapter = lora.set_at({}, "block_0/attention/query", node)
    with pytest.raises(
        ValueError, match=r"update shape \(5, 32\) differs from the base kernel shape \(32, 32\)"
    ):
        MODEL.apply({"params": BASE, "lora": adapter}, jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 20-step run with checkpoints at steps 10 and 20."""
    from jaxmerge.datasets import prepare
    from tests.tiny import tiny_config  # noqa: PLC0415

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare("sklearn_digits", str(data_dir))
    workdir = tmp_path_factory.mktemp("work")
    config = tiny_config(data_dir, steps=20)
    training.train_and_evaluate(config, str(workdir))
    return config, str(workdir), training.run_dir(str(workdir), "lora", "digits")


def _largest_array_file(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/params/**/d/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip_byte(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):
    for entry in os.listdir(step_dir):
        full = os.path.join(step_dir, entry)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def _half_written(step_dir):
    shutil.rmtree(os.path.join(step_dir, "params"))


def _no_metadata(step_dir):
    shutil.rmtree(os.path.join(step_dir, "metadata"))


def _metadata_bit_flip(step_dir):
    path = os.path.join(step_dir, "metadata", "metadata")
    text = open(path).read().replace('"lora"', '"lorb"', 1)
    open(path, "w").write(text)


BREAKAGES = {
    "flipped byte": _flip_byte,
    "truncated": _truncate,
    "empty": _empty,
    "half-written": _half_written,
    "missing metadata": _no_metadata,
    "edited metadata": _metadata_bit_flip,
}


def snapshot(folder) -> dict:
    """Every file under `folder` with its size and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_size, stat.st_mtime)
    return out


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_latest_step_falls_back_to_the_newest_good_one(
    trained_run, tmp_path, breakage, caplog
):
    """A read skips the bad step and leaves it: nothing moved or written (read-only folders)."""
    _, _, run = trained_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    checkpoints = os.path.join(copy, "checkpoints")
    good, _ = checkpoint.load(checkpoints, step=10)
    BREAKAGES[breakage](os.path.join(checkpoints, "20"))
    before = snapshot(copy)
    params, metadata = checkpoint.load(checkpoints)
    assert metadata["step"] == 10
    jax.tree.map(np.testing.assert_array_equal, params, good)
    assert snapshot(copy) == before and not os.path.exists(os.path.join(copy, "checkpoints_bad"))
    assert any(
        "checkpoints/20" in r.getMessage() and "left as it is" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("breakage", ["truncated", "half-written"])
def test_evaluate_on_a_broken_latest_step_prints_one_line(trained_run, tmp_path, breakage):
    """The fallback's warning is the only line on stderr: no TensorStore spec dump, no
    "Event loop is closed" tracebacks from Orbax's callbacks afterwards."""
    _, _, run = trained_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    BREAKAGES[breakage](os.path.join(copy, "checkpoints", "20"))
    command = [sys.executable, "-m", "jaxmerge", "evaluate", "--run", copy]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoints/20" in lines[0] and "left as it is" in lines[0], lines
    assert json.loads(done.stdout)["digits"]["examples"] > 0


def test_closed_loop_reports_are_dropped_and_every_other_report_passes():
    from types import SimpleNamespace

    from jaxmerge import cli

    reported = []
    for error in [RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("bad")]:
        cli.drop_closed_loop_reports(SimpleNamespace(exc_value=error), report=reported.append)
    assert [str(r.exc_value) for r in reported] == ["other", "bad"]


def test_resume_falls_back_too_and_reaches_the_same_step(trained_run, tmp_path):
    """Training alone moves a corrupted step aside (it saves that step again)."""
    config, workdir, run = trained_run
    copy_workdir = str(tmp_path / "work")
    shutil.copytree(workdir, copy_workdir)
    copy = training.run_dir(copy_workdir, "lora", "digits")
    _flip_byte(os.path.join(copy, "checkpoints", "20"))
    result = training.train_and_evaluate(config, copy_workdir)
    assert result["step"] == 20 and os.path.isdir(os.path.join(copy, "checkpoints_bad", "20"))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_changed_model_is_a_changed_config_and_nothing_moves(trained_run, tmp_path):
    """Arrays of other shapes are another model, not corruption: the one-line config error
    (or, resuming with a changed config allowed, the one-line model mismatch), nothing moved."""
    config, workdir, _ = trained_run
    copy_workdir = str(tmp_path / "work")
    shutil.copytree(workdir, copy_workdir)
    before = snapshot(copy_workdir)
    for section, leaf, value, message in [
        ("lora", "rank", 4, "lora.rank: 8 -> 4"),
        ("lora", "targets", "all", "lora.targets: 'qv' -> 'all'"),
        ("head", "hidden", 8, "head.hidden: 16 -> 8"),
    ]:
        changed = config.copy_and_resolve_references()
        changed[section][leaf] = value
        with pytest.raises(ValueError, match=f"differs from the checkpoint's in {message}; use"):
            training.train_and_evaluate(changed, copy_workdir)
    changed.resume_with_changed_config = True
    with pytest.raises(checkpoint.ModelMismatch, match=r"checkpoints/20 holds another model"):
        training.train_and_evaluate(changed, copy_workdir)
    assert snapshot(copy_workdir) == before


def test_training_into_a_model_folder_is_refused(trained_run, tmp_path):
    config, _, run = trained_run
    model = tmp_path / "model"  # a model folder's layout: model.json beside checkpoints/0
    shutil.copytree(os.path.join(run, "checkpoints", "10"), model / "checkpoints" / "0")
    (model / "model.json").write_text("{}")
    before = snapshot(model)
    for workdir in (model, model / "adapters" / "digits" / ".." / ".."):
        with pytest.raises(ValueError, match=r"^--workdir: .*model is a model folder"):
            training.train_and_evaluate(config, str(workdir))
    os.makedirs(model / "adapters" / "digits")  # the run folder inside it
    (model / "adapters" / "digits" / "model.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^--workdir: .*digits is a model folder"):
        training.train_and_evaluate(config, str(model))
    os.remove(model / "adapters" / "digits" / "model.json")
    os.removedirs(model / "adapters" / "digits")
    assert snapshot(model) == before


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing", "checkpoint folder .*missing/checkpoints does not exist"),
        ("file", r"checkpoint folder .*file/checkpoints does not exist \(it is a file\)"),
    ],
)
def test_reads_never_create_folders(tmp_path, where, message):
    target = tmp_path / where
    if where == "file":
        target.mkdir()
        (target / "checkpoints").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(str(target / "checkpoints"))
    assert where == "file" or not target.exists()


def test_a_step_asked_for_by_number_is_never_replaced(trained_run, tmp_path):
    _, _, run = trained_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    _flip_byte(os.path.join(copy, "checkpoints", "20"))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/20.*corrupted"):
        checkpoint.load(os.path.join(copy, "checkpoints"), step=20)


# ----------------------------------------------------------------------------- runs


def test_resume_with_a_changed_config_is_refused_naming_the_fields(trained_run, tmp_path):
    config, workdir, _ = trained_run
    copy_workdir = str(tmp_path / "work")
    shutil.copytree(workdir, copy_workdir)
    changed = config.copy_and_resolve_references()
    changed.learning_rate, changed.log_every = 0.01, 10  # log_every cannot change the result
    with pytest.raises(
        ValueError, match=r"differs from the checkpoint's in learning_rate: 0.001 -> 0.01; use"
    ):
        training.train_and_evaluate(changed, copy_workdir)
    changed.resume_with_changed_config = True
    assert training.train_and_evaluate(changed, copy_workdir)["step"] == 20


def test_a_second_process_on_the_same_run_is_refused(trained_run, tmp_path):
    config, _, _ = trained_run
    run = training.run_dir(str(tmp_path), "lora", "digits")
    os.makedirs(run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(run, run_lock.LOCK_FILE), "w") as f:
            json.dump({"pid": holder.pid, "host": __import__("socket").gethostname()}, f)
        with pytest.raises(
            run_lock.RunLockedError, match=f"is being trained by process {holder.pid}"
        ):
            training.train_and_evaluate(config, str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone now: its stale lock is taken over and the run trains.
    assert training.train_and_evaluate(config, str(tmp_path))["step"] == 20
    assert not os.path.exists(os.path.join(run, run_lock.LOCK_FILE))


# ----------------------------------------------------------------------------- the CLIs


@pytest.mark.parametrize(
    "flag, message",
    [
        (
            "--config.learning_rate=abc",
            "error: flag --config.learning_rate=abc: could not convert string to float: 'abc'",
        ),
        (
            "--config.learning_rate=inf",
            "error: config.learning_rate: got inf; allowed: a finite number > 0",
        ),
        pytest.param(  # CI's own step: keeps the README's suite under 10 minutes
            "--config.lora.rank=1000",
            "error: LoraConfig.rank: got 1000 for target 'block_0/attention/query'; allowed: at most min(in, out) = 128",
            marks=pytest.mark.slow,
        ),
        ("--config.base.source=checkpoint", "error: config.base.path: got ''"),
        (
            "--config.base.source=checkpoint --config.base.path=/nonexistent/base",
            "error: config.base.path: '/nonexistent/base' (resolved from",
        ),
        (
            "--config.base.source=checkpoint --config.base.path=/etc/hostname",
            "error: config.base.path: '/etc/hostname' (resolved from",
        ),
    ],
)
def test_config_errors_are_one_line_and_exit_2_before_compile(
    tmp_path, capsys, monkeypatch, flag, message
):
    # In this process (a subprocess costs a JAX import each); the test below checks, once,
    # that the error is also the only line a real `python -m jaxmerge train` prints.
    argv = [
        "--config",
        f"{ROOT}/configs/adapter.py:task=digits",
        f"--workdir={tmp_path}",
        "--config.model.variant=mu/4",
        "--config.model.image_size=8",
        *flag.split(),
    ]
    status, lines = run_command(train_command, argv, capsys, monkeypatch)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines


def test_a_config_error_is_the_only_line_a_train_process_prints(tmp_path):
    command = [
        sys.executable,
        "-m",
        "jaxmerge",
        "train",
        "--config",
        f"{ROOT}/configs/adapter.py:task=digits",
        f"--workdir={tmp_path}",
        "--config.model.variant=mu/4",
        "--config.model.image_size=8",
        "--config.foo=1",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: --config.foo: unknown config field 'foo'; see the config file for its fields"
    ], run.stderr


def test_a_failed_save_is_one_line_naming_the_step_and_the_cause(tmp_path, monkeypatch):
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"))

    def full_disk(*args, **kwargs):
        raise OSError("[Errno 28] No space left on device\n" + "spec dump line\n" * 60)

    monkeypatch.setattr(mngr, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.save(mngr, 10, {"w": jnp.ones(3)}, {"m": jnp.zeros(3)}, {})
    message = str(error.value)
    assert "checkpoints/10 could not be written: disk full ([Errno 28] No space left" in message
    assert "\n" not in message
