"""A training config resolved once into the typed part that each owner reads.

    parts = run_config.resolve(config)   # validated, the task defined
    model_def, base, _ = load.load_base(parts.model, parts.base)
    batches = data.train_batches(parts.task, parts.data, model_def.image_size)

`resolve` checks every field (`config_lib.validate`, which reads no data), defines the task and
hands back `RunParts`: the model family with its own variant arguments (`models.load`), the
LoRA settings (`lora.init_adapter`), the head (`heads.build`), the optimiser
(`training.make_optimizer`), the input pipeline's settings (`input_pipeline`), the loop's and the
config as a run saves it. Nothing downstream decodes the ConfigDict again. A run folder's saved
config (its format unchanged, so old runs load) comes back as parts through `of_saved`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from jaxmerge import config_lib, lora, models, tasks


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`config.model` resolved: the family, its constructor arguments (the variant's table,
    the family's own fields of config.model, the overrides) and how the module computes."""

    family: str
    architecture: tuple[tuple[str, Any], ...]  # (name, value) pairs; `kwargs` as a dict
    dtype: str = "float32"
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    kernels: str = "auto"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.architecture)

    @property
    def image_size(self) -> int:
        return self.kwargs["image_size"]

    @property
    def pooler(self) -> bool:
        """A ViT's pooler (a family without one: False); `load_pretrained` reads it."""
        return bool(self.kwargs.get("pooler", False))


@dataclasses.dataclass(frozen=True)
class BaseSettings:
    """`config.base`: where the base parameters come from; `seed` draws a random base."""

    source: str = "random"
    path: str = ""
    seed: int = 10_000


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """`config.head`: an "mlp" head of `hidden` units (0: linear) or a zero-shot head read
    from `zero_shot_file`."""

    type: str = "mlp"
    hidden: int = 256
    zero_shot_file: str = ""


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW on a warmup-cosine schedule, clipped by global norm (`training.make_optimizer`)."""

    learning_rate: float
    steps: int
    warmup_steps: int
    end_learning_rate_factor: float
    weight_decay: float
    grad_clip_norm: float


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What the input pipeline reads: where the data lives, batch sizes, augmentation,
    threads and worker processes, and the normalisation `(x / 255 - mean) / std` the model
    was trained with."""

    data_dir: str  # expanded; "" in the config = the TFDS default
    manual_dir: str = ""
    batch_size: int = 128
    eval_batch_size: int = 256
    crop_padding: int = 0
    threads: int = 1
    workers: int = 0
    seed: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @property
    def normalization(self) -> dict[str, tuple[float, ...]]:
        """`{"mean", "std"}`, as keyword arguments of `input_pipeline.preprocess`."""
        return {"mean": self.mean, "std": self.std}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The training loop's own fields."""

    mode: str
    seed: int
    steps: int
    log_every: int
    checkpoint_every: int
    tensorboard: bool = True
    resume_with_changed_config: bool = False


@dataclasses.dataclass(frozen=True)
class RunParts:
    """A training config resolved: each owner's part. `lora` is None unless mode is "lora";
    `task` None for a saved config read without its run (`of_saved`)."""

    task: tasks.Task | None
    train: TrainSettings
    model: ModelSettings
    base: BaseSettings
    lora: lora.LoraConfig | None
    head: HeadSettings
    optimizer: OptimizerSettings
    data: DataSettings
    record: dict = dataclasses.field(hash=False, compare=False)  # the config as a run saves it


def resolve(config: ml_collections.ConfigDict) -> RunParts:
    """Validates `config` and resolves it into its parts, the task defined (a task named by
    `config.dataset` reads its dataset, prepared first on first use).

    Raises:
      ValueError: naming the first bad field, its value and what is allowed.
    """
    config_lib.validate(config)
    data = data_settings(config)
    task = config_lib.define_task(config, data.data_dir)
    config_lib.check_head_fits_task(config.head, task)
    adapter = config_lib.lora_config(config) if config.mode == "lora" else None
    return _parts(config, task, adapter, data)


def of_saved(config: ml_collections.ConfigDict, task: tasks.Task | None = None) -> RunParts:
    """The parts of a config a run saved (not validated again: its files may have moved).
    Fields added since it was written take their defaults, which are what such runs ran."""
    c = ml_collections.ConfigDict(_merge(config_lib.base_config().to_dict(), config.to_dict()))
    adapter = config_lib.lora_config(c) if c.mode == "lora" else None
    return _parts(c, task, adapter, data_settings(c))


def _merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def _parts(
    c: ml_collections.ConfigDict,
    task: tasks.Task | None,
    adapter: lora.LoraConfig | None,
    data: DataSettings,
) -> RunParts:
    return RunParts(
        task=task,
        train=TrainSettings(
            c.mode,
            c.seed,
            c.steps,
            c.log_every,
            c.checkpoint_every,
            bool(c.tensorboard),
            bool(c.resume_with_changed_config),
        ),
        model=model_settings(c),
        base=BaseSettings(c.base.source, c.base.path, c.seed + 10_000),
        lora=adapter,
        head=HeadSettings(c.head.type, c.head.hidden, c.head.zero_shot_file),
        optimizer=OptimizerSettings(
            c.learning_rate,
            c.steps,
            c.warmup_steps,
            c.end_learning_rate_factor,
            c.weight_decay,
            c.grad_clip_norm,
        ),
        data=data,
        record=_record(c, data),
    )


def model_settings(c: ml_collections.ConfigDict) -> ModelSettings:
    """`config.model` (and the LoRA dropout the module applies): the family reads its own
    fields of config.model (`Family.config_fields`), never another family's."""
    family = models.get(c.model.family)
    own = {field: c.model[field] for field in family.config_fields}
    overrides = {k: v for k, v in c.model.overrides.items() if v}
    kwargs = family.variant(c.model.variant, **own, **overrides)
    return ModelSettings(
        family.name,
        tuple(kwargs.items()),
        c.model.dtype,
        c.lora.dropout,
        c.model.lora_compute,
        c.model.kernels,
    )


def data_settings(c: ml_collections.ConfigDict) -> DataSettings:
    """The input pipeline's settings; the normalisation is `config.model.pixel_mean` and
    `pixel_std` where set (a run records them), else the model family's (CLIP's own
    statistics, [-1, 1] for the others)."""
    mean, std = tuple(c.model.pixel_mean or ()), tuple(c.model.pixel_std or ())
    if not (mean and std):
        family = models.get(c.model.family)
        mean, std = family.pixel_mean, family.pixel_std
    return DataSettings(
        data_dir=os.path.expanduser(c.data_dir or os.path.join("~", "tensorflow_datasets")),
        manual_dir=c.manual_dir,
        batch_size=c.batch_size,
        eval_batch_size=c.eval_batch_size,
        crop_padding=c.crop_padding,
        # JPEG decoding and numpy release the GIL: threads scale with cores (benchmarks/).
        threads=c.data_threads or min(32, os.cpu_count() or 1),
        # At most one per core: a run's record may come from a bigger machine than this one.
        workers=min(c.data_workers, os.cpu_count() or 1),
        seed=c.seed,
        mean=tuple(mean),
        std=tuple(std),
    )


def _record(c: ml_collections.ConfigDict, data: DataSettings) -> dict:
    """The config as saved with a run, its paths (base, data_dir, manual_dir, the zero-shot
    head file) made absolute: `evaluate`, merges and predict load the run from any working
    directory."""
    record = json.loads(c.to_json_best_effort())
    # The normalisation the run trained with, even where it came from the family's default.
    record["model"]["pixel_mean"] = list(data.mean)
    record["model"]["pixel_std"] = list(data.std)
    record["base"]["path"] = _absolute(record["base"]["path"])
    record["data_dir"] = _absolute(record["data_dir"])
    record["manual_dir"] = _absolute(record["manual_dir"])
    if record["head"].get("zero_shot_file"):
        record["head"]["zero_shot_file"] = _absolute(record["head"]["zero_shot_file"])
    return record


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path
