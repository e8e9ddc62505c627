"""Write the zero-shot heads file of a task set: CLIP text embeddings of class-name prompts.

Once per CLIP checkpoint, a Hugging Face `CLIPModel` folder with its tokenizer (e.g.
openai/clip-vit-base-patch32 saved with `save_pretrained`), after preparing the datasets (class
names are read from each task's TFDS builder):

    python -m jaxmerge zero_shot_heads --model ~/models/clip-vit-base-patch32 \
        --data_dir ~/tensorflow_datasets --output ~/models/clip-vit-base-patch32/zero_shot.npz

`--tasks` picks the tasks (default: the CLIP suite). The file's arrays and how they are
computed: `jaxmerge.text_heads`; `jaxmerge.zero_shot` reads it.
"""

from __future__ import annotations

import os

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import text_heads


def define_flags():
    flags.DEFINE_string("model", None, "A Hugging Face CLIPModel folder with its tokenizer.")
    flags.DEFINE_string(
        "data_dir", os.path.expanduser("~/tensorflow_datasets"), "The TFDS data folder."
    )
    flags.DEFINE_list("tasks", None, "Comma-separated task names; default: the CLIP suite.")
    flags.DEFINE_string("output", None, "The .npz file to write (new).")


def main(argv):
    del argv
    args = flags.FLAGS
    classes = text_heads.write_heads(args.model, args.output, args.tasks, args.data_dir)
    written = ", ".join(f"{t} ({len(c)})" for t, c in classes.items())
    print(f"wrote {args.output}: {written}")


def cli():
    cli_lib.run(main, define_flags, required=["model", "output"])


if __name__ == "__main__":
    cli()
