"""Training one run: a LoRA adapter (or a head-finetuning baseline, or the full model) of a task.

`train_and_evaluate(config, workdir)` trains or resumes the run a config describes
(`python -m jaxmerge train` is the command over it). Data parallel: one jitted update (state
donated) on a 1-D ('data',) mesh over every device of every host; the batch is sharded along
it and parameters are replicated. The base is an input of the update, never part of the
optimised state, so it has no optimizer state.

Outputs, under `workdir/<mode>/<task>/`: Orbax checkpoints (`checkpoint.py`), `metrics.jsonl`
(one line per logged step and per evaluation), `result.json` (the final evaluation) and, with
`config.tensorboard`, the same scalars as TensorBoard events in `tensorboard/`. On multi-host
runs every process writes its part of the checkpoints; only process 0 writes the other files
and draws the progress bar (`logs`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import (
    checkpoint,
    config_resume,
    heads,
    input_pipeline,
    logs,
    lora,
    plain_names,
    run_config,
    run_lock,
    scoring,
    tasks,
)
from jaxmerge.models import load

Tree = Any
# Wait on a result at least this often: multi-device CPU loops that never wait can deadlock in
# a collective (seen here after ~60 s), and NaN checks need the value anyway.
MAX_STEPS_WITHOUT_SYNC = 10


class TrainState(NamedTuple):
    step: jax.Array
    params: Tree  # what is trained: {"lora", "head"}, {"head"} or {"base", "head"}
    opt_state: Tree


def run_dir(workdir: str, mode: str, task: str) -> str:
    """Where one run's checkpoints and metrics live: adapters/, heads/ or full/ per task."""
    plain_names.check_plain_name("task", task)  # never a path out of the workdir
    return os.path.join(workdir, {"lora": "adapters", "head": "heads", "full": "full"}[mode], task)


def make_schedule(settings: run_config.OptimizerSettings) -> optax.Schedule:
    """The learning rate of update k (0-based): linear warmup, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        decay_steps=max(settings.steps, settings.warmup_steps + 1),
        end_value=settings.learning_rate * settings.end_learning_rate_factor,
    )


def make_optimizer(settings: run_config.OptimizerSettings) -> optax.GradientTransformation:
    """AdamW with `make_schedule`'s learning rate and global-norm clipping.

    Weight decay applies to matrices only (not biases, norms or the constant LoRA `scale`).
    """
    schedule = make_schedule(settings)
    matrices_only = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip_norm),
        optax.adamw(schedule, weight_decay=settings.weight_decay, mask=matrices_only),
    )


def init_params(
    lora_config: lora.LoraConfig | None, mode: str, model_def, head_def, base: Tree, key: jax.Array
) -> Tree:
    """The trained parameters of a new run in `mode`: a LoRA adapter of `lora_config` (mode
    "lora") or a copy of the base ("full"), and a fresh head (a zero-shot head's `init` reads
    its file; it stays frozen)."""
    lora_key, head_key = jax.random.split(key)
    feature = jnp.zeros((1, model_def.width), jnp.float32)
    params = {"head": head_def.init(head_key, feature)["params"]}
    if mode == "lora":
        params["lora"] = lora.init_adapter(lora_key, base, lora_config)
    elif mode == "full":
        params["base"] = base
    return params


def make_train_step(model_def, head_def, task: tasks.Task, optimizer):
    """update(state, base, batch, rng) -> (state, metrics), jitted with the state donated."""
    kind, spec = task.head_kind, task.loss_spec

    def loss_fn(params, base, batch, rng):
        outputs = scoring.forward(model_def, head_def, params, base, batch["image"], True, rng)
        return kind.loss(outputs, batch, spec).mean(), outputs

    def update(state: TrainState, base: Tree, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, base, batch, rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {name: v.mean() for name, v in kind.metrics(outputs, batch, spec).items()}
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(update, donate_argnums=(0,))


def _drop_logged_after(path: str, step: int) -> None:
    """Rewrites a metrics file without the records of steps after `step` (the run is resumed
    from there and logs them again) and without a torn last line. Process 0 only, as it alone
    writes the file."""
    if not logs.is_writer() or not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("split") != "train" or record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run the config describes and returns its final evaluation.

    One process at a time per run folder (`run_lock`); a resume under a config that differs
    from the checkpoint's in a field that changes the result is refused unless
    `config.resume_with_changed_config`.
    """
    # Every value checked and resolved into each owner's part before anything compiles.
    parts = run_config.resolve(config)
    directory = run_dir(workdir, parts.train.mode, parts.task.name)
    check_not_a_model_folder(workdir, directory)
    make_writable_folder(directory)
    # Process 0 holds the lock for the whole multi-host job: on a shared filesystem the other
    # processes would find it taken by their own job.
    with run_lock.hold(directory) if logs.is_writer() else contextlib.nullcontext():
        return _train_and_evaluate(parts, directory)


def make_writable_folder(directory: str) -> None:
    """Makes the run folder and checks that files can be written in it, before anything loads
    or compiles; ValueError naming --workdir otherwise (a read-only mount, no permission)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(
            f"--workdir: cannot write the run folder {directory} ({error.strerror or error}); "
            f"allowed: a writable folder"
        ) from None


def check_not_a_model_folder(workdir: str, directory: str) -> None:
    """Refuses a workdir or run folder that is (or sits in) a model folder: its checkpoint is
    no training step to resume, and a model folder holds the only copy of its model."""
    from jaxmerge.model_folder import MODEL_FILE

    folder = os.path.abspath(directory)
    top = os.path.dirname(os.path.abspath(workdir))
    while folder != top and folder != os.path.dirname(folder):
        if os.path.isfile(os.path.join(folder, MODEL_FILE)):
            raise ValueError(
                f"--workdir: {folder} is a model folder ({MODEL_FILE}, written by `python -m "
                f"jaxmerge merge`), not a training run; allowed: a workdir outside model folders"
            )
        folder = os.path.dirname(folder)


def _train_and_evaluate(parts: run_config.RunParts, directory: str) -> dict[str, float]:
    task, settings = parts.task, parts.train
    mesh = input_pipeline.data_mesh()
    replicated = NamedSharding(mesh, P())

    model_def, base, base_info = load.load_base(parts.model, parts.base)
    head_def = heads.build(parts.head, task, model_def.width)
    base = jax.device_put(base, replicated)
    base_print = checkpoint.fingerprint(base)
    optimizer = make_optimizer(parts.optimizer)

    key = jax.random.key(settings.seed)
    params = init_params(parts.lora, settings.mode, model_def, head_def, base, key)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    state = jax.device_put(state, replicated)

    mngr = checkpoint.manager(os.path.join(directory, "checkpoints"))
    metadata = {
        "task": task.name,
        # The task itself, so the run loads where the task is not registered.
        "task_definition": tasks.registry.to_record(task),
        "mode": settings.mode,
        "model": base_info,
        "lora": parts.record["lora"] if settings.mode == "lora" else None,
        # The head module (`heads.from_record` rebuilds it) and the task's head kind.
        "head": {**heads.to_record(head_def), "kind": task.kind},
        "base_fingerprint": base_print,
        "config": parts.record,
    }
    if mngr.all_steps():
        # The config first, from the newest step's metadata alone: a changed lora.rank or head
        # makes arrays of other shapes, which must be named as a changed config, not a
        # corrupted step (`checkpoint.restore` also refuses them, without moving anything).
        newest = checkpoint.read_metadata(mngr, max(mngr.all_steps()))
        if newest is not None and not settings.resume_with_changed_config:
            config_resume.check_unchanged(newest.get("config", {}), metadata["config"], directory)
        params, opt_state, saved = checkpoint.restore(
            mngr, state.params, state.opt_state, expected_base=base_print
        )
        if not settings.resume_with_changed_config:
            config_resume.check_unchanged(saved.get("config", {}), metadata["config"], directory)
        state = jax.device_put(
            TrainState(jnp.asarray(saved["step"]), params, opt_state), replicated
        )
        logs.info(f"{directory}: resumed from step {saved['step']}")
        _drop_logged_after(os.path.join(directory, "metrics.jsonl"), saved["step"])
    start = int(state.step)

    train_step = make_train_step(model_def, head_def, task, optimizer)
    eval_step = scoring.make_eval_step(model_def, head_def, task)
    rng = jax.random.key(settings.seed + 1)
    metrics_path = os.path.join(directory, "metrics.jsonl")
    batches = input_pipeline.train_batches(task, parts.data, model_def.image_size, start_step=start)
    sync_every = min(settings.log_every, MAX_STEPS_WITHOUT_SYNC)
    schedule = make_schedule(parts.optimizer)
    tensorboard = logs.Scalars(
        os.path.join(directory, "tensorboard"),
        enabled=settings.tensorboard,
        # A resume logs the steps after `start` again: TensorBoard hides the old ones.
        purge_step=start + 1 if start else None,
    )

    bar = logs.progress(
        total=settings.steps, initial=start, desc=f"{settings.mode}:{task.name}", unit="step"
    )
    last_time, last_step = time.perf_counter(), start
    with contextlib.closing(tensorboard), contextlib.closing(bar):
        for step in range(start, settings.steps):
            state, metrics = train_step(
                state, base, input_pipeline.shard_batch(next(batches), mesh), rng
            )
            done = step + 1
            if done % sync_every and done != settings.steps:
                continue
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"{directory}: loss became {metrics['loss']} at step {done}; the last good "
                    f"checkpoint (step {mngr.latest_step()}) is kept; lower config.learning_rate"
                )
            now = time.perf_counter()
            images_per_s = (done - last_step) * parts.data.batch_size / (now - last_time)
            last_time, last_step = now, done
            bar.update(done - bar.n)
            main = task.head_kind.main_metric
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                **{main: f"{metrics.get(main, 0):.3f}"},
                img_s=f"{images_per_s:.0f}",
            )
            if done % settings.log_every == 0 or done == settings.steps:
                # The rate of the last update (update k uses schedule(k)).
                learning_rate = float(schedule(done - 1))
                record = {"images_per_s": images_per_s, "learning_rate": learning_rate, **metrics}
                logs.append_jsonl(metrics_path, {"step": done, "split": "train", **record})
                tensorboard.write("train", record, done)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                checkpoint.save(mngr, done, state.params, state.opt_state, metadata)
        bar.close()

        result = scoring.evaluate(
            eval_step,
            state.params,
            base,
            input_pipeline.eval_batches(task, parts.data, model_def.image_size),
            mesh,
        )
        result = {"task": task.name, "mode": settings.mode, "step": int(state.step), **result}
        logs.append_jsonl(metrics_path, {"split": task.eval_split, **result})
        tensorboard.write(task.eval_split, result, result["step"])
    if logs.is_writer():
        with open(os.path.join(directory, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
