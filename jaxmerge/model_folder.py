"""The multi-task model folder: one merged backbone and every task's head, ready to predict.

    model = model_folder.load("digits_and_boxes")
    outputs = model.predict(images)  # {task: (B, outputs)}, one backbone pass for every task
    rows = model.predict_images([load_upright("a.png")])  # [{task: readable prediction}]

A folder, written by `python -m jaxmerge.merge` (`save`), holds:

  model.json    the model family and architecture, each task (head kind, outputs, hidden size,
                head module: `heads.to_record`, an MLP or a frozen zero-shot head; label
                names, metric, target, loss spec, the input its dataset stores), the
                preprocessing (`image_input`), the base fingerprint,
                and the merge recipe (method, weights, parameters, a learned merge's record,
                each source run's path with SHA-256 checksums of its adapter and head);
  checkpoints/0 an Orbax checkpoint (`jaxmerge.checkpoint`, checksummed) of
                {"base", "merged", "heads": {task: head}}; with `fold`, "base" is the backbone
                with the merged adapter folded in and there is no "merged".

The checkpoint's metadata holds the SHA-256 of model.json, so an edited or corrupted model.json
is refused on load just as a corrupted array is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

import jaxmerge
from jaxmerge import checkpoint, data, heads, image_input, lora, models, multitask
from jaxmerge import runs as runs_lib
from jaxmerge.data import ops

Tree = Any
FORMAT = "jaxmerge.multitask_model/1"
MODEL_FILE, CHECKPOINTS = "model.json", "checkpoints"
# checkpoint.save keeps an optimizer state and Orbax refuses an empty tree; a model has none.
_NO_OPT_STATE = {"none": np.zeros((), np.int8)}


@dataclasses.dataclass(frozen=True)
class MultiTaskModel:
    """A loaded model: one backbone (adapter folded in) and a head per task.

    `tasks` and `info` are model.json's task entries and whole content; `merged` is the merged
    adapter (None when saved folded or loaded from a single run).
    """

    model_def: Any
    backbone: Tree
    head_defs: Mapping[str, Any]  # `heads.from_record` modules
    head_params: Mapping[str, Tree]
    tasks: Mapping[str, Mapping[str, Any]]
    info: Mapping[str, Any]
    merged: Tree | None
    predictor: Callable = dataclasses.field(repr=False, compare=False)

    def predict(self, images) -> dict[str, np.ndarray]:
        """{task: (B, outputs)} raw head outputs for preprocessed images (B, S, S, 3)."""
        outputs = self.predictor(self.backbone, dict(self.head_params), jnp.asarray(images))
        return {task: np.asarray(outputs[task]) for task in self.tasks}  # model.json's order

    def predict_images(
        self, rgb_images: Sequence[np.ndarray], batch_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Readable predictions (`outputs_to_predictions`) for upright uint8 (H, W, 3) images
        (`datasets.common.load_upright`), each prepared as its task's training images were
        (`image_input`): one backbone pass per distinct task input. `batch_size` pads the
        batch, so repeated calls compile once."""
        outputs = {}
        for record, names in image_input.input_groups(self.tasks, self.info["preprocessing"]):
            inputs = [
                image_input.model_input(rgb, self.info["preprocessing"], record)
                for rgb in rgb_images
            ]
            batch = np.zeros((max(batch_size or 0, len(inputs)), *inputs[0].shape), np.float32)
            batch[: len(inputs)] = np.stack(inputs)
            predicted = self.predict(batch)
            outputs.update({name: predicted[name][: len(inputs)] for name in names})
        shapes = [np.shape(rgb)[:2] for rgb in rgb_images]
        return outputs_to_predictions(outputs, self.tasks, shapes)


# ----------------------------------------------------------------------------- describing


def label_names(task, data_dir: str) -> list[str] | None:
    """The class names of a classification task's TFDS ClassLabel feature, or None."""
    if task.kind != "classification" or not task.dataset:  # e.g. a PEFT folder's task
        return None
    try:
        import tensorflow_datasets as tfds

        import jaxmerge.datasets  # noqa: F401  (registers jaxmerge's builders)

        feature = tfds.builder(task.dataset, data_dir=data_dir).info.features[task.target]
    except Exception:  # names are a nicety: any dataset problem (not prepared...) gives indices
        return None
    names = list(getattr(feature, "names", None) or [])
    return names if len(names) == task.outputs else None


def task_info(run) -> dict[str, Any]:
    """A run's task as model.json records it (what `outputs_to_predictions` needs)."""
    task = run.task
    if task.preprocess is not None:
        raise ValueError(
            f"task {task.name!r} has its own preprocessing ({task.preprocess.__name__}); "
            f"allowed: tasks with the default one (a model folder records only that)"
        )
    return {
        "kind": task.kind,
        "outputs": task.outputs,
        "hidden": heads.to_record(run.head_def)["hidden"],
        "head": heads.to_record(run.head_def),
        "labels": label_names(task, data.data_dir(run.config)),
        "input": image_input.dataset_input(task.dataset, data.data_dir(run.config)),
        "metric": task.head_kind.main_metric,
        "higher_is_better": task.head_kind.higher_is_better,
        "target": task.target,
        "spec": json.loads(json.dumps(dict(task.spec))),  # tuples as lists
        "dataset": task.dataset,
        "about": task.about,
    }


def preprocessing_info(model_def, config) -> dict[str, Any]:
    """model.json's "preprocessing" (`image_input.describe`): a file's steps, then
    `data.image_steps` at evaluation with the run's normalisation."""
    return image_input.describe(
        model_def.image_size, model_def.channels, data.normalization(config)
    )


def preprocess_fn(preprocessing: Mapping[str, Any]) -> ops.Preprocess:
    """`(example, rng) -> example` on a stored {"image": uint8 (H, W, C)}: the ops of
    evaluation (`image_input.model_steps`)."""
    return image_input.model_steps(preprocessing)


def check_one_normalization(runs) -> None:
    """A model folder prepares images once for every head: its runs must have trained on
    images normalised alike (`data.normalization`)."""
    normalizations = {run.directory: data.normalization(run.config) for run in runs}
    if len({json.dumps(n) for n in normalizations.values()}) > 1:
        listing = "; ".join(f"{d}: {n}" for d, n in normalizations.items())
        raise ValueError(
            f"--run: runs trained on differently normalised images cannot share one model "
            f"folder's preprocessing: {listing}"
        )


def describe(runs, model_def, recipe: Mapping[str, Any], fold: bool) -> dict[str, Any]:
    """model.json's content for runs merged by `recipe` (method, weights, params, learned)."""
    config = runs[0].config
    check_one_normalization(runs)
    family = config.model.get("family", "vit")
    keys = models.get(family).architecture_keys
    sources = [
        {
            "task": run.task.name,
            "path": os.path.abspath(run.directory),
            "adapter_sha256": checkpoint.checksum(run.adapter),
            "head_sha256": checkpoint.checksum(run.head),
        }
        for run in runs
    ]
    return {
        "format": FORMAT,
        "jaxmerge_version": jaxmerge.__version__,
        "model": {
            "family": family,
            "kwargs": {k: getattr(model_def, k) for k in keys},
            "dtype": config.model.dtype,
        },
        "tasks": {run.task.name: task_info(run) for run in runs},
        "preprocessing": preprocessing_info(model_def, config),
        "base": {"source": config.base.source, "path": config.base.path},
        "base_fingerprint": runs[0].base_fingerprint,
        "folded": bool(fold),
        "merge": {**recipe, "runs": sources},
    }


# ----------------------------------------------------------------------------- writing


def check_output_folder(folder: str, flag: str = "--output") -> None:
    """Refuses a path that is a file or a non-empty folder (a model is never overwritten)."""
    if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder)):
        raise ValueError(
            f"{flag}: {folder!r} exists and is not empty; allowed: a new or empty folder "
            f"(remove it or choose another)"
        )


def save(folder: str, info: Mapping[str, Any], base: Tree, merged: Tree, head_params) -> str:
    """Writes a model folder (see the module docstring); returns its absolute path.

    With `info["folded"]`, the checkpoint holds `lora.fold_into_base(base, merged)` as "base"
    and no "merged". Written to a hidden sibling folder, then renamed: a crash leaves no
    half-written model.
    """
    folder = os.path.abspath(folder)
    check_output_folder(folder)
    params = {"heads": dict(head_params)}
    if info["folded"]:
        params["base"] = lora.fold_into_base(base, merged)
    else:
        params.update(base=base, merged=merged)
    text = json.dumps(info, indent=2) + "\n"
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        with open(os.path.join(partial, MODEL_FILE), "w") as f:
            f.write(text)
        metadata = {"format": FORMAT, "model_json_sha256": _sha256(text.encode())}
        mngr = checkpoint.manager(os.path.join(partial, CHECKPOINTS), max_to_keep=1)
        checkpoint.save(mngr, 0, params, _NO_OPT_STATE, metadata)
        mngr.close()
        if os.path.isdir(folder):  # an empty folder the user made: take its place
            os.rmdir(folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp's private 0o700 is for the partial only
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# ----------------------------------------------------------------------------- reading


def build_model(model: Mapping[str, Any]):
    """The module model.json's "model" entry describes."""
    family = models.get(model["family"])
    return family.module(**model["kwargs"], dtype=jnp.dtype(model["dtype"]))


def _assemble(model_def, backbone, head_params, info, merged) -> MultiTaskModel:
    tasks = info["tasks"]
    # Folders written before head records held "hidden" and "outputs" only: MLP heads.
    head_defs = {t: heads.from_record(v.get("head", v)) for t, v in tasks.items()}
    predictor = multitask.make_predictor(model_def, head_defs)
    return MultiTaskModel(
        model_def, backbone, head_defs, head_params, tasks, info, merged, predictor
    )


def load(folder: str) -> MultiTaskModel:
    """Reads a model folder, verified (array, metadata and model.json checksums).

    Raises:
      ValueError: not a model folder. checkpoint.CheckpointError: a corrupted checkpoint or a
        model.json that does not match the checksum saved with the checkpoint.
    """
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"--model: {folder!r} is not a model folder (no {MODEL_FILE}); allowed: a folder "
            f"written by `python -m jaxmerge.merge` or a run folder WORKDIR/adapters/<task>"
        )
    params, metadata = checkpoint.load(os.path.join(folder, CHECKPOINTS), step=0)
    with open(path, "rb") as f:
        content = f.read()
    if metadata.get("model_json_sha256") != _sha256(content):
        raise checkpoint.CheckpointError(
            f"model folder {folder}: {MODEL_FILE} does not match the checksum saved with its "
            f"checkpoint (edited or corrupted); write the model again with jaxmerge.merge"
        )
    info = json.loads(content)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format {info.get('format')!r}; allowed: {FORMAT!r}")
    merged = params.get("merged")
    backbone = params["base"] if info["folded"] else lora.fold_into_base(params["base"], merged)
    return _assemble(build_model(info["model"]), backbone, params["heads"], info, merged)


def from_run(directory: str) -> MultiTaskModel:
    """A single training run (WORKDIR/<mode>/<task>) as a one-task model, its adapter folded."""
    run = runs_lib.load(directory)
    if run.config.mode == "full":
        raise ValueError(
            f"--model: {directory!r} is a full-finetuning run; allowed: a LoRA or head run "
            f"(WORKDIR/adapters/<task>, WORKDIR/heads/<task>) or a model folder"
        )
    model_def, base = runs_lib.base_of([run])
    backbone = base if run.adapter is None else lora.fold_into_base(base, run.adapter)
    recipe = {"method": None, "weights": None, "params": {}, "learned": None}
    info = describe([run], model_def, recipe, fold=True)
    return _assemble(model_def, backbone, {run.task.name: run.head}, info, None)


# ----------------------------------------------------------------------------- outputs


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def outputs_to_predictions(
    outputs: Mapping[str, np.ndarray],
    tasks: Mapping[str, Mapping[str, Any]],
    image_shapes: Sequence[tuple[int, int]],
) -> list[dict[str, Any]]:
    """Raw head outputs -> one {task: prediction} per image, in the task's own units.

    classification: {"label": name (or index as text), "index", "probability": softmax max};
    regression: {"value": outputs * std + mean} (the loss standardised the target);
    landmarks: {"points": [[x, y], ...]} in pixels of the upright input image, mapped back
    through the centre square the input was cut from (`image_input.points_in_image`).

    Args:
      outputs: {task: (B, outputs)}; tasks: model.json's task entries;
      image_shapes: (height, width) of each of the B upright input images before cropping.
    """
    rows: list[dict[str, Any]] = [{} for _ in image_shapes]
    for task, info in tasks.items():
        values = np.asarray(outputs[task], np.float64)[: len(image_shapes)]
        if info["kind"] == "classification":
            probabilities = _softmax(values)
            for row, p in zip(rows, probabilities):
                index = int(np.argmax(p))
                label = info["labels"][index] if info.get("labels") else str(index)
                row[task] = {"label": label, "index": index, "probability": float(p[index])}
        elif info["kind"] == "regression":
            spec = info["spec"]
            for row, v in zip(rows, values[:, 0] * spec["std"] + spec["mean"]):
                row[task] = {"value": float(v)}
        elif info["kind"] == "landmarks":
            for row, v, (height, width) in zip(rows, values, image_shapes):
                points = image_input.points_in_image(v.reshape(-1, 2), height, width)
                row[task] = {"points": points.round(2).tolist()}
        else:
            raise ValueError(
                f"task {task!r}: head kind {info['kind']!r}; allowed: {sorted(heads.HEAD_KINDS)}"
            )
    return rows


# ----------------------------------------------------------------------------- exports


def check_peft_exportable(merged: Tree | None, folded: bool, method: str | None) -> None:
    """Raises ValueError unless the merged adapter can be written as a PEFT LoRA folder."""
    if folded or merged is None:
        raise ValueError(
            "--export_peft: the model is saved folded (--fold), so it holds no separate merged "
            "adapter; merge again without --fold to export one"
        )
    dense = [path for path, node in lora.target_items(merged) if "lora_a" not in node]
    if dense:
        raise ValueError(
            f"--export_peft: method {method!r} returned dense deltas (e.g. at {dense[0]!r}), "
            f"which PEFT LoRA cannot hold; allowed: a factored result (a PEFT method, or "
            f"--merge_param output=factored for the delta-space methods)"
        )


def export_peft(model: MultiTaskModel | str, directory: str, naming: str = "v5") -> str:
    """Writes a model's merged adapter as a PEFT LoRA folder (`interop.peft_export`), module
    names by the family's own `NameMap` (`Family.names`: CLIPVisionModel's for CLIP, ViTModel's
    for a ViT); `model` is a loaded model or a model folder. Returns the folder written."""
    from jaxmerge.interop import peft_export

    model = load(model) if isinstance(model, str) else model
    check_peft_exportable(model.merged, model.info["folded"], model.info["merge"]["method"])
    family = models.get(model.info["model"]["family"])
    if family.names is None:
        raise ValueError(f"--export_peft: family {family.name!r} has no Hugging Face names")
    check_output_folder(directory, "--export_peft")
    base = model.info.get("base", {})
    name = base.get("path") if base.get("source") == "hf" else None  # a Hub / HF folder name
    peft_export.save_peft_adapter(
        directory, model.merged, naming=naming, base_model_name_or_path=name, names=family.names
    )
    return os.path.abspath(directory)


def check_hf_exportable(model_def, family: str) -> None:
    """Raises ValueError unless `family` writes the backbone as a Hugging Face model."""
    if models.get(family).save_hf is None:
        with_export = sorted(n for n, f in models.FAMILIES.items() if f.save_hf)
        raise ValueError(f"--export_hf: family {family!r} has no export; allowed: {with_export}")
    if getattr(model_def, "pool", "cls") != "cls":
        raise ValueError(
            f"--export_hf: the backbone pools by {model_def.pool!r}; allowed: pool='cls', the "
            f"class token a ViTModel reads"
        )


def export_hf(model: MultiTaskModel | str, directory: str, naming: str = "v4") -> str:
    """Writes a model's backbone (merged adapter folded in) by the family's `save_hf` (the
    ViT's writes a `ViTModel` folder); `model` is a loaded model or a model folder."""
    model = load(model) if isinstance(model, str) else model
    family = models.get(model.info["model"]["family"])
    check_hf_exportable(model.model_def, family.name)
    check_output_folder(directory, "--export_hf")
    return family.save_hf(directory, model.info["model"]["kwargs"], model.backbone, naming)
