"""The multi-task model folder: one merged backbone and every task's head, ready to predict.

    model = model_folder.load("digits_and_boxes")
    outputs = model.predict(images)  # {task: (B, outputs)}, one backbone pass for every task
    rows = model.predict_images([load_upright("a.png")])  # [{task: readable prediction}]

A folder, written by `python -m jaxmerge merge` (`save`), holds:

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

`python -m jaxmerge merge --fuse static|router|mixture` writes a fused folder instead
(`fused`): each task's adapter kept apart with learned gates, checksummed alike, loaded by
the same `load`.

The package's modules: `describe` (model.json's content), `folder` (write, load, checksums),
`checks` (model.json against its arrays), `staging` (checked, then written whole or not at
all), `model` (the loaded `MultiTaskModel` and its readable predictions), `multitask` (the
one-pass forward of every head), `export` (PEFT and Hugging Face exports), `fused` (the fused
folder's model.json, arrays and checks).
"""

from jaxmerge.model_folder import fused, multitask, staging
from jaxmerge.model_folder.describe import (
    FORMAT,
    check_one_normalization,
    data_settings,
    describe,
    label_names,
    preprocess_fn,
    preprocessing_info,
    task_info,
    task_of,
)
from jaxmerge.model_folder.export import (
    check_hf_exportable,
    check_peft_exportable,
    export_hf,
    export_peft,
    write_hf,
    write_peft,
)
from jaxmerge.model_folder.folder import (
    CHECKPOINTS,
    MODEL_FILE,
    check_output_folder,
    from_run,
    load,
    save,
    write,
    write_fused,
)
from jaxmerge.model_folder.model import (
    MultiTaskModel,
    assemble,
    build_model,
    outputs_to_predictions,
)

__all__ = [
    "CHECKPOINTS",
    "FORMAT",
    "MODEL_FILE",
    "MultiTaskModel",
    "assemble",
    "build_model",
    "check_hf_exportable",
    "check_one_normalization",
    "check_output_folder",
    "check_peft_exportable",
    "data_settings",
    "describe",
    "export_hf",
    "export_peft",
    "from_run",
    "fused",
    "label_names",
    "load",
    "multitask",
    "outputs_to_predictions",
    "preprocess_fn",
    "preprocessing_info",
    "save",
    "staging",
    "task_info",
    "task_of",
    "write",
    "write_fused",
    "write_hf",
    "write_peft",
]
