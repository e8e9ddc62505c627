"""Multi-host: `--distributed` jobs of two processes on localhost (2 CPU devices each, a
coordinator at 127.0.0.1, gloo collectives: JAX's default on CPU) give what one process on 4
devices gives, and only process 0 writes files and prints results."""

import contextlib
import glob
import importlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxmerge import checkpoint, cli, training
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # per job, every process included; then all are killed
TOLERANCE = 1e-6
# A short tiny run: batch 16 splits over 4 devices; steps 2 and 4 are logged, 4 is saved.
TRAIN_FLAGS = [
    f"--config={ROOT}/configs/adapter.py:task=digits",
    "--config.model.variant=mu/4",
    "--config.model.overrides.depth=1",
    "--config.model.overrides.width=32",
    "--config.model.overrides.mlp_dim=64",
    "--config.model.overrides.num_heads=2",
    "--config.model.image_size=8",
    "--config.batch_size=16",
    "--config.eval_batch_size=64",
    "--config.head.hidden=16",
    "--config.steps=4",
    "--config.warmup_steps=1",
    "--config.log_every=2",
    "--config.checkpoint_every=4",
    "--config.lora.dropout=0.1",
    "--config.tensorboard=True",
]
# A learned merge of a few steps on a few images per task.
LEARNED = ["--merge_param=steps=3", "--merge_param=images=16"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict:
    """The environment of one process with `devices` CPU devices (and no SLURM job's variables,
    when the tests themselves run under SLURM)."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("SLURM_")},
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _jobs(command: str, args, own_flags=lambda name: [], slurm: bool = False):
    """The command lines of one command's two-process job (2 devices each, "process_0" and
    "process_1") and of the one-process reference (4 devices, "single"): [(name, argv, env)].
    `own_flags(name)` adds a job's own flags. The job's processes are told where process 0
    listens, how many they are and which each is by flags, or with `slurm` as `srun` tells
    them (its environment variables)."""
    command = [sys.executable, "-m", "jaxmerge", command, *args]
    port = _free_port()
    jobs = [("single", [*command, *own_flags("single")], _env(4))]
    for process_id in (0, 1):
        name, env = f"process_{process_id}", _env(2)
        flags = [
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        if slurm:
            flags = ["--distributed"]
            env.update(
                SLURM_JOB_ID="1",
                SLURM_STEP_NODELIST="127.0.0.1",
                SLURM_NTASKS="2",
                SLURM_PROCID=str(process_id),
                SLURM_LOCALID=str(process_id),
                JAX_COORDINATOR_PORT=str(port),
            )
        jobs.append((name, [*command, *flags, *own_flags(name)], env))
    return jobs


def _run_all(jobs, tmp_path) -> dict[str, str]:
    """Runs every job at once; returns each one's stdout. Fails, after killing every process
    still running, as soon as one fails or when TIMEOUT_S has passed."""
    processes, logs = {}, {}
    with contextlib.ExitStack() as stack:
        for name, argv, env in jobs:
            out = stack.enter_context(open(tmp_path / f"{name}.out", "w+"))
            err = stack.enter_context(open(tmp_path / f"{name}.err", "w+"))
            logs[name] = (out, err)
            processes[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                codes = {name: p.poll() for name, p in processes.items()}
                if any(code not in (None, 0) for code in codes.values()):
                    break
                if all(code == 0 for code in codes.values()):
                    break
                time.sleep(0.1)
        finally:
            killed = [name for name, p in processes.items() if p.poll() is None]
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                process.wait()
        texts = {}
        for name, (out, err) in logs.items():
            out.seek(0), err.seek(0)
            texts[name] = (out.read(), err.read())
    ended = {n: "killed" if n in killed else f"exit {p.returncode}" for n, p in processes.items()}
    failed = [
        f"{name}: {ended[name]}\n{texts[name][1][-2000:]}"
        for name, p in processes.items()
        if p.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    return {name: out for name, (out, _) in texts.items()}


def _printed(stdout: str) -> list[str]:
    """What a command printed, without gloo's connection lines ("[Gloo] Rank 1 is connected to
    1 peer ranks. ..."), which gloo's C++ side writes unsynchronised with Python's stdout: a
    line can arrive split, its "[Gloo] Rank " on one line and the rest on the next."""
    return [
        line
        for line in stdout.splitlines()
        if not line.startswith("[Gloo]") and "peer ranks" not in line
    ]


def _max_difference(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _files(folder) -> set[str]:
    """The files of a run folder but its checkpoints (Orbax has every process write its part),
    TensorBoard's event files named by their folder (their names hold the time and host)."""
    paths = glob.glob(f"{folder}/**", recursive=True)
    kept = [os.path.relpath(p, folder) for p in paths if os.path.isfile(p)]
    kept = [os.path.dirname(p) if p.startswith("tensorboard") else p for p in kept]
    return {p for p in kept if not p.startswith("checkpoints")}


def _numbers(record, path=""):
    """{path: value} of every number in a JSON record ("seconds" left out: wall time)."""
    if isinstance(record, dict):
        items = record.items()
    elif isinstance(record, list):
        items = enumerate(record)
    else:
        return {path: record} if isinstance(record, float | int) else {}
    out = {}
    for key, value in items:
        if key != "seconds":
            out.update(_numbers(value, f"{path}/{key}"))
    return out


def _assert_close_records(multi, single):
    a, b = _numbers(multi), _numbers(single)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=TOLERANCE), key


@pytest.mark.slow  # three interpreters at once (1 to 2 min on 2 busy cores): CI's own step
def test_two_processes_train_the_adapter_of_one(data_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = [*TRAIN_FLAGS, f"--config.data_dir={data_dir}"]
    workdir = lambda name: [f"--workdir={single if name == 'single' else multi}"]
    printed = _run_all(_jobs("train", args, workdir), tmp_path)

    run_single, run_multi = (training.run_dir(str(w), "lora", "digits") for w in (single, multi))
    adapter_single, _ = checkpoint.load(os.path.join(run_single, "checkpoints"))
    adapter_multi, saved = checkpoint.load(os.path.join(run_multi, "checkpoints"))
    assert saved["step"] == 4
    assert _max_difference(adapter_multi, adapter_single) < TOLERANCE
    result = json.load(open(os.path.join(run_multi, "result.json")))
    _assert_close_records(result, json.load(open(os.path.join(run_single, "result.json"))))
    # Process 0 alone wrote the run's files: the same ones as one process (one TensorBoard
    # event file, named after its writer's pid), each metrics line once.
    assert _files(run_multi) == _files(run_single) != set()
    assert len(glob.glob(os.path.join(run_multi, "tensorboard", "*"))) == 1
    lines = [json.loads(line) for line in open(os.path.join(run_multi, "metrics.jsonl"))]
    assert [r.get("step") for r in lines] == [2, 4, 4]
    assert json.loads(_printed(printed["process_0"])[-1]) == result
    assert _printed(printed["process_1"]) == []


@pytest.fixture(scope="module")
def two_runs(data_dir, tmp_path_factory):
    """Two tiny adapters (a classification and a regression task) to merge."""
    workdir = str(tmp_path_factory.mktemp("runs"))
    for task in ("digits", "digits_value"):
        config = tiny_config(data_dir, task=task, steps=2, warmup_steps=1, log_every=2)
        training.train_and_evaluate(config, workdir)
    return [
        f"--run={training.run_dir(workdir, 'lora', task)}" for task in ("digits", "digits_value")
    ]


@pytest.mark.slow  # three interpreters at once (1 to 2 min on 2 busy cores): CI's own step
def test_two_processes_evaluate_a_learned_merge_as_one(two_runs, tmp_path):
    """Scoring (data parallel over both processes) after a learned merge, in a job launched as
    SLURM's `srun` launches it; each process is given its own --output, and only process 0's
    is written."""
    output = lambda name: [f"--output={tmp_path / name}.json"]
    args = [*two_runs, "--merge=learned_output_match", *LEARNED]
    printed = _run_all(_jobs("evaluate", args, output, slurm=True), tmp_path)

    single = json.load(open(tmp_path / "single.json"))
    multi = json.load(open(tmp_path / "process_0.json"))
    assert not (tmp_path / "process_1.json").exists()
    assert multi["digits"]["examples"] == 359 and "mae" in multi["digits_value"]
    _assert_close_records(multi, single)
    assert json.loads("\n".join(_printed(printed["process_0"])))["digits"] == multi["digits"]
    assert _printed(printed["process_1"]) == []


@pytest.mark.slow  # three interpreters at once (1 to 2 min on 2 busy cores): CI's own step
def test_two_processes_merge_into_the_model_folder_of_one(two_runs, tmp_path):
    """Both processes are given the same --output; process 0 alone writes it."""
    from jaxmerge import model_folder

    output = lambda name: [f"--output={tmp_path / ('single' if name == 'single' else 'multi')}"]
    args = [*two_runs, "--method=learned_output_match", *LEARNED]
    printed = _run_all(_jobs("merge", args, output), tmp_path)

    single, multi = (model_folder.load(str(tmp_path / name)) for name in ("single", "multi"))
    assert _max_difference(multi.backbone, single.backbone) < TOLERANCE
    assert _max_difference(multi.head_params, single.head_params) == 0.0
    assert not glob.glob(str(tmp_path / ".*partial*"))
    assert json.loads("\n".join(_printed(printed["process_0"])))["output"] == str(
        tmp_path / "multi"
    )
    assert _printed(printed["process_1"]) == []


@pytest.mark.parametrize(
    "module",
    [
        "jaxmerge.commands.train",
        "jaxmerge.commands.evaluate",
        "jaxmerge.commands.merge",
        "experiments.study",
    ],
)
def test_commands_that_compute_on_a_pod_take_distributed(module, monkeypatch):
    given = {}
    monkeypatch.setattr(cli, "run", lambda main, define_flags, **kwargs: given.update(kwargs))
    importlib.import_module(module).cli()
    assert given["distributed"] is True


@pytest.mark.slow  # a fresh interpreter (about 10 s): CI's own step
def test_commands_start_no_jax_backend_before_they_join_the_job():
    """`jax.distributed.initialize` must come before JAX starts a backend: importing the
    commands and reading the study's config (all that runs before `cli.start_distributed`)
    starts none."""
    script = (
        "import experiments.study, jaxmerge.__main__\n"
        "import jaxmerge.commands.evaluate, jaxmerge.commands.merge, jaxmerge.commands.train\n"
        "from jax._src import xla_bridge\n"
        "from ml_collections.config_flags import config_flags\n"
        "parser = config_flags.ConfigFileFlagParser('config')\n"
        "parser.parse('experiments/configs/offline.py:seeds=1,learned=quick')\n"
        "parser.parse('configs/adapter.py:task=digits')\n"
        "print(xla_bridge.backends_are_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(2),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False"]
