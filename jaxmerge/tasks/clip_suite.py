"""The 8-task CLIP suite of the model-merging literature (task arithmetic, TIES, AdaMerging,
FusionBench, KnOTS): SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD.

Datasets by TFDS name where TFDS has them, prepared as array_record (`python -m
jaxmerge prepare --dataset NAME --data_dir DIR`; resisc45 needs its manual download);
GTSRB, which TFDS lacks, from the official download (`jaxmerge/datasets/gtsrb.py`).
EuroSAT and RESISC45 ship one `train` split in TFDS: the suite holds out its last 20% (TFDS
split slicing, the same examples on every machine) as the eval split; the other tasks use
their own test split (SUN397: the `tfds` config's test split; DTD: split 1's test split).
These splits follow TFDS, not FusionBench's own files, so per-task accuracies are comparable
in kind with the published tables, not example for example.

Preprocessing is the default one with the base family's pixel normalisation: resize to the
model's size (squashed, no crop), RGB, then `(x / 255 - mean) / std` with CLIP's mean and std on
a CLIP base (`models.clip.CLIP_MEAN`, `CLIP_STD`), [-1, 1] on SigLIP and ViT bases. No flips;
the suite's config sets no crop either (`crop_padding=0`), as the literature's fine-tuning runs.
Being data, not code, it is recorded in a merged model folder like any other task's.
"""

from __future__ import annotations

from jaxmerge.tasks.registry import Task, register

# name -> (dataset, classes, train split, eval split, about), in the literature's order.
TASKS = {
    "sun397": ("sun397/tfds", 397, "train", "test", "SUN397 scenes, 397 classes"),
    "cars": ("cars196", 196, "train", "test", "Stanford Cars, 196 car models"),
    "resisc45": (
        "resisc45",
        45,
        "train[:80%]",
        "train[80%:]",
        "RESISC45 aerial scenes, 45 classes",
    ),
    "eurosat": (
        "eurosat/rgb",
        10,
        "train[:80%]",
        "train[80%:]",
        "EuroSAT satellite land use, 10 classes",
    ),
    "svhn": ("svhn_cropped", 10, "train", "test", "SVHN house-number digits, 10 classes"),
    "gtsrb": ("gtsrb/size224", 43, "train", "test", "GTSRB traffic signs, 43 classes"),
    "mnist": ("mnist", 10, "train", "test", "MNIST handwritten digits, 10 classes"),
    "dtd": ("dtd", 47, "train", "test", "DTD describable textures, 47 classes"),
}

for _name, (_dataset, _classes, _train, _eval, _about) in TASKS.items():
    register(
        Task(
            _name,
            _dataset,
            "classification",
            _classes,
            train_split=_train,
            eval_split=_eval,
            flip=False,
            suite="clip",
            about=_about,
        )
    )
