"""The training config: its defaults and its validation.

Every `configs/*.py` starts from `base_config()` and overrides what it needs, so every config
has every field and `validate` can check each one before anything compiles, without reading
any data. What needs more than the fields is here too: `define_task` (a task named by its
dataset reads the dataset), `check_head_fits_task` and `lora_config`. `run_config.resolve`
calls them once and hands each owner its typed part.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections

from jaxmerge import heads, lora, models, plain_names, tasks, zero_shot
from jaxmerge.models import cpu_kernels, layers

BASE_SOURCES = ("random", "checkpoint", "hf", "bigvision")
MODES = ("lora", "head", "full")
DTYPES = ("float32", "bfloat16")
MAX_SEED = 2**32 - 1 - 10_000  # see `validate`


def base_config() -> ml_collections.ConfigDict:
    """Every field a training run reads, with defaults for a small offline run."""
    c = ml_collections.ConfigDict()
    c.task = "digits"
    c.mode = "lora"  # lora: adapter + head; head: head finetuning; full: everything
    c.seed = 0
    c.data_dir = ""  # TFDS data_dir; "" = the TFDS default (~/tensorflow_datasets)
    c.manual_dir = ""  # where the paper's hand-downloaded files are

    # A task defined by a prepared dataset's name instead of a registered `config.task`
    # (jaxmerge.tasks.from_dataset): config.task is then the new task's own name.
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = ""  # e.g. "image_folder/shapes-size64" or a TFDS name ("mnist")
    c.dataset.kind = ""  # "" = from the target feature: "classification", "regression" or
    # "landmarks" (a float feature of shape (K, 2): K points, (x, y) relative to the image)
    c.dataset.target = ""  # "" = "label"
    c.dataset.outputs = 0  # classes, for kind=classification on integer targets
    c.dataset.train_split = ""  # "" = "train"
    c.dataset.eval_split = ""  # "" = "test", else "validation"
    c.dataset.flip = True  # random horizontal flips in training (landmarks: with a permutation)
    c.dataset.norm_points = ""  # landmarks: "i,j", whose distance normalises NME ("" = none)
    c.dataset.flip_permutation = ""  # landmarks: "p0,p1,...", the point a flip moves each to

    c.model = ml_collections.ConfigDict()
    c.model.family = "vit"  # a name in jaxmerge.models.FAMILIES
    c.model.variant = "Ti/4"
    c.model.image_size = 32
    c.model.pool = "cls"
    c.model.pooler = False
    c.model.layer_norm_eps = 1e-6
    c.model.gelu_approximate = False
    c.model.dtype = "float32"
    # Images enter the model as (x / 255 - pixel_mean) / pixel_std per channel. () = the
    # family's (models.Family: CLIP's statistics on clip, [-1, 1] otherwise); a base
    # pretrained otherwise (e.g. DeiT's ImageNet statistics) sets them. A run records them.
    c.model.pixel_mean = ()
    c.model.pixel_std = ()
    # How LoRA factors are applied: "branch" (x @ a @ b beside the kernel, the default: measured
    # faster for training in benchmarks/RESULTS.md) or "fold" (x @ (kernel + s a @ b)).
    c.model.lora_compute = "branch"
    c.model.kernels = "auto"  # LayerNorm / GELU: "auto" (CPU-tuned on CPU), "cpu" or "plain"
    c.model.overrides = ml_collections.ConfigDict(
        {"depth": 0, "width": 0, "mlp_dim": 0, "num_heads": 0}
    )

    c.base = ml_collections.ConfigDict()
    c.base.source = "random"  # random | checkpoint (a jaxmerge run folder) | hf | bigvision
    c.base.path = ""

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.targets = "qv"
    c.lora.dropout = 0.0
    c.lora.use_rslora = False

    c.head = ml_collections.ConfigDict()
    c.head.hidden = 256
    # "mlp": a trained MlpHead (hidden 0: linear); "zero_shot": CLIP's frozen classifier of
    # the task from `zero_shot_file` (`python -m jaxmerge zero_shot_heads` makes it;
    # `jaxmerge.zero_shot` reads it).
    c.head.type = "mlp"
    c.head.zero_shot_file = ""

    c.batch_size = 128
    c.eval_batch_size = 256
    c.steps = 300
    c.learning_rate = 1e-3
    c.warmup_steps = 30
    c.end_learning_rate_factor = 0.01
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0
    c.crop_padding = 2  # random-crop padding in pixels (0: no crop augmentation)
    # Threads reading, decoding and augmenting images (0: one per CPU core, at most 32). They
    # share Python's lock: at 224 px two prepare no more images than one (benchmarks/RESULTS.md).
    # Batches do not depend on it.
    c.data_threads = 0
    # Worker processes preparing whole batches (0: none, the threads above do it), at most one
    # per CPU core and as many as /dev/shm holds (2 batches each). They scale with cores: 600 to
    # 860 images/s each at 224 px, where an accelerator trains on thousands a second. Each
    # starts a Python of its own (about 2 s and 150 MB), so small images are faster with
    # threads. Batches do not depend on it.
    c.data_workers = 0
    c.log_every = 10
    c.checkpoint_every = 100
    # TensorBoard event files of the logged scalars in `<run>/tensorboard/` (needs tensorboardX;
    # skipped with a note without it). metrics.jsonl is written either way and stays the record.
    c.tensorboard = True
    # A resumed run must have the checkpoint's config (but for RESULT_NEUTRAL fields) unless
    # this is set: a changed learning rate or step count would silently change the run.
    c.resume_with_changed_config = False
    return c


_check = plain_names.check_field


def _check_normalization(model: ml_collections.ConfigDict) -> None:
    """pixel_mean and pixel_std: both () (the family's), or finite numbers, one or one per
    channel, std > 0."""
    mean, std = tuple(model.get("pixel_mean", ())), tuple(model.get("pixel_std", ()))
    _check(bool(mean) == bool(std), "model.pixel_std", std, f"set with pixel_mean={mean}")
    for field, values in (("pixel_mean", mean), ("pixel_std", std)):
        _check(
            len(values) in (0, 1, 3)
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            and (field == "pixel_mean" or all(v > 0 for v in values)),
            f"model.{field}",
            values,
            "() for the model family's, or 1 or 3 finite numbers"
            + (", > 0" if field == "pixel_std" else ""),
        )


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field, its value and what is allowed."""
    import jax

    _check_task(c)
    _check(c.mode in MODES, "mode", c.mode, str(MODES))
    # JAX keeps the low 32 bits of a seed (seed 2**32 is seed 0) and the base's key is seed +
    # 10000: a larger seed would silently repeat a smaller one, or overflow in JAX.
    _check(
        isinstance(c.seed, int) and not isinstance(c.seed, bool) and 0 <= c.seed <= MAX_SEED,
        "seed",
        c.seed,
        f"an integer from 0 to {MAX_SEED}",
    )
    family = models.get(c.model.family)
    family.variant(c.model.variant)
    _check(c.model.pool in ("cls", "mean"), "model.pool", c.model.pool, "('cls', 'mean')")
    _check(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, str(DTYPES))
    _check(
        c.model.lora_compute in layers.LORA_COMPUTES,
        "model.lora_compute",
        c.model.lora_compute,
        str(layers.LORA_COMPUTES),
    )
    _check(
        c.model.kernels in cpu_kernels.KERNELS,
        "model.kernels",
        c.model.kernels,
        str(cpu_kernels.KERNELS),
    )
    _check_normalization(c.model)
    patch = family.variant(c.model.variant)["patch_size"]
    _check(
        isinstance(c.model.image_size, int)
        and c.model.image_size > 0
        and c.model.image_size % patch == 0,
        "model.image_size",
        c.model.image_size,
        f"a positive multiple of the patch size {patch}",
    )
    _check(c.base.source in BASE_SOURCES, "base.source", c.base.source, str(BASE_SOURCES))
    if c.base.source != "random":
        _check(
            bool(c.base.path), "base.path", c.base.path, f"a path (base.source={c.base.source!r})"
        )
    if c.mode == "lora":
        lora_config(c)  # LoraConfig validates rank, alpha, dropout and the target regex
    _check(
        isinstance(c.head.hidden, int) and c.head.hidden >= 0,
        "head.hidden",
        c.head.hidden,
        "an integer >= 0",
    )
    _check_head(c.head)
    devices = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        value = c[field]
        _check(
            isinstance(value, int) and value > 0 and value % devices == 0,
            field,
            value,
            f"a positive multiple of the device count {devices}",
        )
    for field in ("steps", "log_every", "checkpoint_every"):
        _check(isinstance(c[field], int) and c[field] > 0, field, c[field], "an integer > 0")
    _check(
        0 <= c.warmup_steps < c.steps,
        "warmup_steps",
        c.warmup_steps,
        f"0 <= warmup_steps < steps={c.steps}",
    )
    _check(
        isinstance(c.learning_rate, (int, float)) and 0 < c.learning_rate < float("inf"),
        "learning_rate",
        c.learning_rate,
        "a finite number > 0",
    )
    _check(
        0 <= c.end_learning_rate_factor <= 1,
        "end_learning_rate_factor",
        c.end_learning_rate_factor,
        "[0, 1]",
    )
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    _check(c.grad_clip_norm > 0, "grad_clip_norm", c.grad_clip_norm, "a number > 0")
    _check(
        isinstance(c.crop_padding, int) and c.crop_padding >= 0,
        "crop_padding",
        c.crop_padding,
        "an integer >= 0",
    )
    _check(isinstance(c.tensorboard, bool), "tensorboard", c.tensorboard, "True or False")
    _check(
        isinstance(c.data_threads, int) and c.data_threads >= 0,
        "data_threads",
        c.data_threads,
        "an integer >= 0 (0: one per CPU core)",
    )
    _check(
        isinstance(c.data_workers, int) and c.data_workers >= 0,
        "data_workers",
        c.data_workers,
        "an integer >= 0 (0: no worker processes)",
    )
    _check(
        c.checkpoint_every % min(c.log_every, 10) == 0,
        "checkpoint_every",
        c.checkpoint_every,
        f"a multiple of min(log_every, 10) = {min(c.log_every, 10)} (checkpoint after a NaN check)",
    )


def _check_head(head: ml_collections.ConfigDict) -> None:
    """The head type, and that a zero-shot head's file exists (`check_head_fits_task` checks it
    against the task, `heads.build` against the backbone width once the base is loaded)."""
    _check(head.type in heads.HEAD_TYPES, "head.type", head.type, str(heads.HEAD_TYPES))
    if head.type != zero_shot.HEAD:
        return
    path = head.zero_shot_file
    _check(
        bool(path) and os.path.isfile(os.path.expanduser(path)),
        "head.zero_shot_file",
        path,
        "an existing file of `python -m jaxmerge zero_shot_heads`",
    )


def _check_task(c: ml_collections.ConfigDict) -> None:
    """The registered `config.task`, or the fields of the task `config.dataset` defines that
    can be checked without reading the dataset (`define_task` reads it)."""
    plain_names.check_plain_name("task", c.task)
    if not c.dataset.name:
        tasks.get(c.task)
        return
    d = c.dataset
    plain_names.check_dataset_name(d.name)
    _check(isinstance(d.outputs, int) and d.outputs >= 0, "dataset.outputs", d.outputs, ">= 0")
    _int_list("dataset.norm_points", d.get("norm_points", ""), "'i,j'")
    _int_list("dataset.flip_permutation", d.get("flip_permutation", ""), "'0,2,1'")


def define_task(c: ml_collections.ConfigDict, data_dir: str) -> tasks.Task:
    """The run's task: the registered `config.task`, or the one `config.dataset` defines (read
    from the dataset's features in `data_dir`, so it is prepared first where it is not yet;
    `validate` checks every field that it can without the dataset)."""
    if not c.dataset.name:
        return tasks.get(c.task)
    from jaxmerge.tasks import from_dataset

    d = c.dataset
    norm_points = _int_list("dataset.norm_points", d.get("norm_points", ""), "'i,j'")
    permutation = _int_list("dataset.flip_permutation", d.get("flip_permutation", ""), "'0,2,1'")
    return from_dataset.define(
        c.task,
        d.name,
        data_dir,
        c.manual_dir,
        d.kind,
        d.target,
        d.outputs,
        d.train_split,
        d.eval_split,
        bool(d.flip),
        norm_points,
        permutation,
    )


def check_head_fits_task(head: ml_collections.ConfigDict, task: tasks.Task) -> None:
    """A zero-shot head's file against the task (`validate` checked the type and that the
    file exists; `heads.build` checks the backbone width once the base is loaded)."""
    if head.type != zero_shot.HEAD:
        return
    field, path = "head.zero_shot_file", head.zero_shot_file
    _check(
        task.kind == "classification",
        "head.type",
        head.type,
        f"'mlp' for task {task.name!r} ({task.kind}); zero-shot heads classify",
    )
    classes = zero_shot.load_heads(os.path.abspath(os.path.expanduser(path)))["classes"]
    _check(
        task.name in classes,
        field,
        path,
        f"a file holding task {task.name!r} (it holds {sorted(classes)})",
    )
    count = len(classes[task.name])
    _check(
        count == task.outputs,
        field,
        path,
        f"a file with {task.outputs} classes for task {task.name!r} (it has {count})",
    )


def _int_list(field: str, text: str, example: str) -> tuple[int, ...] | None:
    """ "1,0,2" -> (1, 0, 2); "" -> None."""
    if not str(text).strip():
        return None
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(
            f"config.{field}: got {text!r}; allowed: comma-separated integers, e.g. {example}"
        ) from None


def lora_config(c: ml_collections.ConfigDict) -> lora.LoraConfig:
    """The LoraConfig of a training config, `lora.targets` resolved by the model family (a
    preset name or a regex; LoraConfig's own validation names the bad field)."""
    family = models.get(c.model.family)
    # An empty regex is found in every path: it would adapt every dense layer, the patch
    # embedding too, where the user meant none or forgot the value.
    _check(
        isinstance(c.lora.targets, str) and bool(c.lora.targets.strip()),
        "lora.targets",
        c.lora.targets,
        f"a preset {sorted(family.target_presets)} or a non-empty regex of layer paths",
    )
    return lora.LoraConfig(
        rank=c.lora.rank,
        alpha=float(c.lora.alpha),
        targets=family.target_regex(c.lora.targets),
        use_rslora=c.lora.use_rslora,
        dropout=c.lora.dropout,
    )


def parse_arg(
    arg: str | None, known: set[str] | None = None, where: str = "config"
) -> dict[str, str]:
    """'task=digits,mode=head' -> {'task': 'digits', 'mode': 'head'} (the `get_config(arg)`);
    with `known`, a key outside it is an error naming the config file `where`."""
    pairs = [p for p in (arg or "").split(",") if p]
    bad = [p for p in pairs if not re.fullmatch(r"\w+=[^=]*", p)]
    if bad:
        raise ValueError(f"config argument: {bad[0]!r} is not key=value")
    args = dict(p.split("=", 1) for p in pairs)
    if known is not None and args.keys() - known:
        raise ValueError(
            f"{where}: unknown arguments {sorted(args.keys() - known)}; known: {sorted(known)}"
        )
    return args


def plus_separated_ints(text: str, field: str) -> tuple[int, ...]:
    """'2+3+6' -> (2, 3, 6), refusing anything but '+'-separated integers, naming `field`."""
    parts = text.split("+")
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"{field}={text!r}; allowed: '+'-separated integers such as 2+3+6")
    return tuple(int(p) for p in parts)
