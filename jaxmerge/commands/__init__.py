"""The commands, one thin module each: its flags, their checks, and `main`.

    python -m jaxmerge COMMAND [flags]      (installed: `jaxmerge COMMAND [flags]`)
    python -m jaxmerge COMMAND --help       (the command's usage and flags)

A command's work is done by library functions that tests and scripts call directly
(`training`, `evaluation`, `merge_folder`, `prediction`, `datasets.prepare`, `text_heads`);
nothing outside this package and `jaxmerge/__main__.py` imports a command. `COMMANDS` names
each one in the order a walkthrough meets them; a module here is run by its key.
"""

COMMANDS = {
    "prepare": "prepare a dataset builder (offline, downloaded by hand, or your folder)",
    "train": "train one LoRA adapter, head or full model for one task",
    "evaluate": "score runs alone, merged into one backbone, or a model folder",
    "merge": "merge (or fuse) adapters into a multi-task model folder",
    "predict": "run every task of a model on image files",
    "zero_shot_heads": "write CLIP zero-shot heads from class-name prompts",
}
