"""Training: sharded step = single-device step, resume after a kill, checkpoint integrity,
NaN stop, config errors, and the three modes on real data (scikit-learn digits)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import checkpoint, config_lib, heads, input_pipeline, run_config, tasks, training
from jaxmerge import runs as runs_lib
from jaxmerge.models import vit
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_sharded_step_equals_single_device_step():
    """8 devices, batch split 8 ways, give the same update as 1 device (dropout included)."""
    assert jax.device_count() == 8
    config = tiny_config("", **{"lora.dropout": 0.1, "lora.targets": "all"})
    model = vit.ViT(**vit.variant("mu/4", image_size=8), lora_dropout=0.1)
    head = heads.MlpHead(16, 10)
    task = tasks.get("digits")
    base = vit.init_params(model, jax.random.key(0))
    parts = run_config.resolve(config)
    optimizer = training.make_optimizer(parts.optimizer)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = input_pipeline.data_mesh(devices)
        params = training.init_params(parts.lora, "lora", model, head, base, jax.random.key(1))
        state = training.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        step = training.make_train_step(model, head, task, optimizer)
        for _ in range(3):
            state, metrics = step(
                state,
                jax.device_put(base, NamedSharding(mesh, P())),
                input_pipeline.shard_batch(batch, mesh),
                jax.random.key(2),
            )
        assert len(
            state.params["lora"]["block_0"]["attention"]["query"]["lora_a"].sharding.device_set
        ) == len(devices)
        results.append((flat(state.params), float(metrics["loss"])))
    (single, loss1), (sharded, loss8) = results
    assert (
        np.abs(
            single
            - flat(training.init_params(parts.lora, "lora", model, head, base, jax.random.key(1)))
        ).max()
        > 1e-4
    )
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6)
    assert loss8 == pytest.approx(loss1, rel=1e-5)


@pytest.mark.parametrize(
    "mode",
    ["lora", "head", pytest.param("full", marks=pytest.mark.slow)],  # slow: CI's own step
)
def test_modes_train_what_they_should(data_dir, tmp_path, mode):
    config = tiny_config(data_dir, mode=mode, steps=20)
    result = training.train_and_evaluate(config, str(tmp_path))
    # Above chance (0.1, ten digits) after 20 steps: 0.237 (lora), 0.195 (head) and 0.284
    # (full) when written; 0.15 is 18 of 359 examples above chance.
    assert result["examples"] == 359 and result["accuracy"] > 0.15
    params, metadata = checkpoint.load(
        os.path.join(training.run_dir(str(tmp_path), mode, "digits"), "checkpoints")
    )
    expected = {"lora": {"lora", "head"}, "head": {"head"}, "full": {"base", "head"}}[mode]
    assert set(params) == expected and metadata["mode"] == mode and metadata["step"] == 20
    lines = (
        open(os.path.join(training.run_dir(str(tmp_path), mode, "digits"), "metrics.jsonl"))
        .read()
        .splitlines()
    )
    assert len(lines) == 20 // 5 + 1  # every log_every steps, plus the evaluation
    from jaxmerge import evaluation  # each mode scored again on the backbone it trained for

    again = evaluation.evaluate_runs([training.run_dir(str(tmp_path), mode, "digits")])["digits"]
    assert again["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_adapter_learns_digits(data_dir, tmp_path):
    """A real (if short) run on a random base: far above chance (0.1) on held-out digits."""
    config = tiny_config(
        data_dir,
        steps=150,
        learning_rate=3e-3,
        checkpoint_every=150,
        **{"lora.targets": "all", "lora.rank": 4},
    )
    result = training.train_and_evaluate(config, str(tmp_path))
    assert result["accuracy"] > 0.4  # 0.62 when written


def _train_command(workdir, data_dir, steps):
    return [
        sys.executable,
        "-m",
        "jaxmerge",
        "train",
        "--config",
        f"{ROOT}/configs/adapter.py:task=digits",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        "--config.model.variant=mu/4",
        "--config.model.overrides.depth=1",
        "--config.model.overrides.width=32",
        "--config.model.overrides.mlp_dim=64",
        "--config.model.overrides.num_heads=2",
        "--config.model.image_size=8",
        "--config.batch_size=16",
        "--config.head.hidden=16",
        f"--config.steps={steps}",
        "--config.warmup_steps=2",
        "--config.log_every=5",
        "--config.checkpoint_every=10",
        "--config.lora.dropout=0.1",
        "--config.crop_padding=1",
    ]


def _env():
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }


@pytest.mark.slow  # end to end through subprocesses: CI runs it in its own step
def test_killed_run_resumes_to_the_same_adapter(data_dir, tmp_path):
    steps = 200
    straight = subprocess.run(
        _train_command(tmp_path / "straight", data_dir, steps),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(killed, data_dir, steps),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed / "adapters" / "digits" / "checkpoints"
    deadline = time.time() + 300
    while not glob.glob(str(checkpoints / "[1-9]*[0-9]")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = sorted(int(os.path.basename(p)) for p in glob.glob(str(checkpoints / "[0-9]*")))
    assert kept and kept[-1] < steps, f"the run was not interrupted: {kept}"

    resumed = subprocess.run(
        _train_command(killed, data_dir, steps),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = checkpoint.load(str(tmp_path / "straight" / "adapters" / "digits" / "checkpoints"))
    b, _ = checkpoint.load(str(checkpoints))
    np.testing.assert_allclose(flat(b), flat(a), rtol=1e-5, atol=1e-7)
    assert f"resumed from step {kept[-1]}" in resumed.stdout
    metrics = open(killed / "adapters" / "digits" / "metrics.jsonl").read().splitlines()
    logged = [json.loads(line)["step"] for line in metrics if '"train"' in line]
    assert logged == list(range(5, steps + 1, 5))  # every log_every step once, none twice


def _flip_a_byte(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/params/**/d/*", recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.seek(os.path.getsize(biggest) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_checkpoint_is_named_and_earlier_ones_kept(data_dir, tmp_path):
    """A corrupted latest step is named when asked for; otherwise it is moved aside and the
    earlier, intact step is used (tests/test_bad_inputs.py covers every way of breaking it)."""
    config = tiny_config(data_dir, steps=20)
    training.train_and_evaluate(config, str(tmp_path))
    checkpoints = os.path.join(training.run_dir(str(tmp_path), "lora", "digits"), "checkpoints")
    _flip_a_byte(os.path.join(checkpoints, "20"))
    with pytest.raises(checkpoint.CheckpointError, match=os.path.join(checkpoints, "20")):
        checkpoint.load(checkpoints, step=20)
    assert os.path.isdir(os.path.join(checkpoints, "10"))
    _, metadata = checkpoint.load(checkpoints)  # falls back to the earlier, intact step
    assert metadata["step"] == 10
    assert training.train_and_evaluate(config, str(tmp_path))["step"] == 20  # trains 10 -> 20


def test_other_base_is_refused(data_dir, tmp_path):
    training.train_and_evaluate(tiny_config(data_dir, steps=10), str(tmp_path))
    other = tiny_config(data_dir, steps=20, seed=1)  # another random base
    with pytest.raises(ValueError, match="differs from the checkpoint's in seed: 0 -> 1"):
        training.train_and_evaluate(other, str(tmp_path))
    # Even with changed configs allowed, an adapter never resumes on another base.
    other.resume_with_changed_config = True
    with pytest.raises(checkpoint.CheckpointError, match="trained on base"):
        training.train_and_evaluate(other, str(tmp_path))


def test_nan_loss_stops_with_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(
        data_dir, steps=40, learning_rate=1e38, warmup_steps=0, grad_clip_norm=1e38
    )
    with pytest.raises(FloatingPointError, match="loss became"):
        training.train_and_evaluate(config, str(tmp_path))
    checkpoints = os.path.join(training.run_dir(str(tmp_path), "lora", "digits"), "checkpoints")
    for step_dir in glob.glob(os.path.join(checkpoints, "[0-9]*")):
        params, _ = checkpoint.load(checkpoints, step=int(os.path.basename(step_dir)))
        assert np.isfinite(flat(params)).all()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.lora.rank=0", "LoraConfig.rank: got 0"),
        ("--config.mode=partial", "config.mode: got 'partial'"),
        ("--config.batch_size=12", "config.batch_size: got 12"),
        ("--config.model.variant=Q/16", "unknown ViT variant 'Q/16'"),
        ("--config.model.pixel_mean=(0.4,0.5)", "config.model.pixel_std: got ()"),
        (
            "--config.model.pixel_mean=(0.4,0.5) --config.model.pixel_std=(0.2,0.2)",
            "config.model.pixel_mean: got (0.4, 0.5); allowed: () for the model family's, or 1 "
            "or 3 finite numbers",
        ),
        (
            "--config.model.pixel_mean=(0.5,) --config.model.pixel_std=(0.0,)",
            "config.model.pixel_std: got (0.0,); allowed: () for the model family's, or 1 or 3 "
            "finite numbers, > 0",
        ),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, flag, message):
    command = _train_command(tmp_path, tmp_path, 5) + flag.split()
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in run.stderr
    assert not os.path.exists(tmp_path / "adapters")  # nothing ran, nothing written


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_run_records_its_pixel_normalisation_and_is_scored_with_it(data_dir, tmp_path):
    """The family's default is written into the run; a base pretrained with other statistics
    trains and is scored with its own (here ImageNet's), also where the config is gone."""
    from jaxmerge import evaluation

    default = training.run_dir(str(tmp_path / "a"), "lora", "digits")
    training.train_and_evaluate(tiny_config(data_dir, steps=4), str(tmp_path / "a"))
    recorded = checkpoint.load(os.path.join(default, "checkpoints"))[1]["config"]["model"]
    assert (recorded["pixel_mean"], recorded["pixel_std"]) == ([0.5], [0.5])

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    config = tiny_config(data_dir, steps=4, **{"model.pixel_mean": mean, "model.pixel_std": std})
    result = training.train_and_evaluate(config, str(tmp_path / "b"))
    run = runs_lib.load(training.run_dir(str(tmp_path / "b"), "lora", "digits"))
    assert run.parts.data.normalization == {"mean": mean, "std": std}
    example = {"image": np.full((8, 8, 1), 255, np.uint8), "label": 0}
    image = input_pipeline.preprocess(run.task, 8, False, **run.parts.data.normalization)(
        example, None
    )
    np.testing.assert_allclose(image["image"][0, 0], (1 - np.array(mean)) / std, rtol=1e-6)
    again = evaluation.evaluate_runs([run.directory])["digits"]
    assert again["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits"):
        config_lib.validate(tiny_config("", task="nope"))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_evaluate_single_and_merged_runs_on_eight_devices(data_dir, tmp_path):
    """Runs saved from 8-device training load, merge, fold and score on any placement."""
    from jaxmerge import evaluation

    for task in ("digits", "digits_value"):
        training.train_and_evaluate(tiny_config(data_dir, task=task, steps=10), str(tmp_path))
    runs = [training.run_dir(str(tmp_path), "lora", t) for t in ("digits", "digits_value")]
    alone = evaluation.evaluate_runs(runs)
    merged = evaluation.evaluate_runs(runs, "cat", [1.0, 1.0])
    removed = evaluation.evaluate_runs(runs, no_adapter=True)
    for result in (alone, merged, removed):
        assert result["digits"]["examples"] == 359 and "mae" in result["digits_value"]
    training.train_and_evaluate(tiny_config(data_dir, mode="head", steps=10), str(tmp_path))
    head_run = training.run_dir(str(tmp_path), "head", "digits")
    both = evaluation.evaluate_runs([runs[0], head_run])  # one task twice: both results kept
    assert set(both) == {"digits:lora", "digits:head"}
    own = json.load(open(os.path.join(runs[0], "result.json")))
    assert alone["digits"]["accuracy"] == pytest.approx(own["accuracy"], abs=1e-6)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
@pytest.mark.parametrize("devices", [1, 2])
def test_adapter_trained_on_eight_devices_loads_on_fewer(data_dir, tmp_path, devices):
    """A checkpoint records the 8-device topology it was saved from; loading it in a plain
    script on 1 or 2 devices, and scoring it with the evaluate CLI there, must still work."""
    config = tiny_config(data_dir, steps=10)
    assert jax.device_count() == 8
    training.train_and_evaluate(config, str(tmp_path))
    run = training.run_dir(str(tmp_path), "lora", "digits")
    saved, _ = checkpoint.load(os.path.join(run, "checkpoints"))
    script = (
        "import sys, jax, numpy as np\n"
        "from jaxmerge import checkpoint\n"
        "params, _ = checkpoint.load(sys.argv[1])\n"
        "assert jax.device_count() == int(sys.argv[2]), jax.device_count()\n"
        "np.savez(sys.argv[3], *jax.tree.leaves(params))\n"
    )
    env = {**_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = tmp_path / "leaves.npz"
    loaded = subprocess.run(
        [sys.executable, "-c", script, os.path.join(run, "checkpoints"), str(devices), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    with np.load(out) as leaves:
        for index, leaf in enumerate(jax.tree.leaves(saved)):
            np.testing.assert_array_equal(leaves[f"arr_{index}"], leaf)
    scored = subprocess.run(
        [sys.executable, "-m", "jaxmerge", "evaluate", f"--run={run}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    own = json.load(open(os.path.join(run, "result.json")))
    assert json.loads(scored.stdout)["digits"]["accuracy"] == pytest.approx(
        own["accuracy"], abs=1e-6
    )
