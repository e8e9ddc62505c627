"""Merge trained adapters into one multi-task model folder (`jaxmerge.model_folder`).

    python -m jaxmerge merge --run W/adapters/digits --run W/adapters/digit_box \
        --method ties --weights 0.5,0.5 --merge_param density=0.5 --output models/digits_box
    python -m jaxmerge merge --run W/adapters/digits --run W/adapters/digit_box \
        --method learned_output_match --fold --output models/learned
    python -m jaxmerge merge ... --method cat --output models/cat --export_peft exported/cat
    python -m jaxmerge merge --peft adapters/cifar --peft adapters/food --base vit-base \
        --method ties --weights 0.5,0.5 --merge_param density=0.5 --output models/cifar_food

`--peft` takes PEFT LoRA folders of Hugging Face ViT classifiers saved with their classifier
(`modules_to_save`), each a task named after its folder, beside or instead of `--run` folders
(all on one base). `--method` is a recipe of `jaxmerge.recipes`: a fixed method, or one that
reads images of each task's training split (learned merges, RegMean). The folder holds the
base and the merged adapter (or, with `--fold`, the backbone with the adapter folded in), every
task's own head (heads are never merged) and model.json;
`python -m jaxmerge predict --model FOLDER IMAGES...` runs it. `--export_peft DIR` also writes
the merged adapter as a PEFT LoRA folder (not for `--fold`, nor for methods that return dense
deltas); `--export_hf DIR` writes the backbone with the merged adapter folded in as a Hugging Face
`ViTModel` folder (`transformers.ViTModel.from_pretrained(DIR, add_pooling_layer=False)`);
the task heads stay in the model folder (they are MLPs on the pooled feature, which a ViTModel
has no place for).

    python -m jaxmerge merge --run W/adapters/digits --run W/adapters/digit_box \
        --fuse mixture --output models/fused

`--fuse static|router|mixture` (instead of `--method`) keeps the adapters apart and fits gates
that mix them at every adapted layer (`jaxmerge.fuse`; `--merge_param steps=300`,
`images=256`, ...), and writes a fused model folder (`model_folder.fused`), which predicts and
evaluates as a merged one does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import logs, merge_folder


def _weights(values: Sequence[str] | None) -> list[float] | None:
    """`--weights` as numbers, or None when not given."""
    if not values:
        return None
    try:
        return [float(w) for w in values]
    except ValueError:
        raise ValueError(f"--weights: got {','.join(values)!r}; allowed: numbers") from None


def define_flags():
    flags.DEFINE_multi_string("run", [], "A LoRA run folder, WORKDIR/adapters/<task>; repeated.")
    flags.DEFINE_multi_string(
        "peft", [], "A PEFT LoRA folder of a ViT classifier (with its classifier); repeated."
    )
    flags.DEFINE_string(
        "base", None, "The Hugging Face ViT folder of the --peft adapters (default: theirs)."
    )
    flags.DEFINE_string("method", None, "A merge method, fixed or learned.")
    flags.DEFINE_string(
        "fuse", None, "Instead of --method: static|router|mixture, a fused model of gated adapters."
    )
    flags.DEFINE_list("weights", None, "One weight per run (fixed methods).")
    flags.DEFINE_multi_string("merge_param", [], "name=value for the merge method.")
    flags.DEFINE_bool("fold", False, "Store the backbone with the merged adapter folded in.")
    flags.DEFINE_string("output", None, "The model folder to write (new or empty).")
    flags.DEFINE_string("export_peft", None, "Also write the merged adapter as a PEFT folder.")
    flags.DEFINE_string(
        "export_hf",
        None,
        "Also write the backbone, merged adapter folded in, as a Hugging Face ViTModel folder.",
    )
    flags.DEFINE_integer("seed", 0, "Random masks (DARE) and learned merges' images.")


def main(argv):
    del argv
    args = flags.FLAGS
    summary = merge_folder.merge_to_folder(
        args.run,
        args.method,
        args.output,
        _weights(args.weights),
        dict(cli_lib.parse_param(p) for p in args.merge_param),
        args.fold,
        args.export_peft,
        args.seed,
        args.export_hf,
        args.peft,
        args.base,
        args.fuse,
    )
    if logs.is_writer():  # multi-host: process 0 wrote the folder and prints the summary
        print(json.dumps(summary, indent=2))


def cli():
    cli_lib.run(main, define_flags, required=["output"], distributed=True)


if __name__ == "__main__":
    cli()
