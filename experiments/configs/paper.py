r"""The paper's suite: Kesim & Helli 2024's six tasks on a pretrained ViT-B/16.

    python -m jaxmerge.datasets.prepare --dataset firerisk --data_dir ~/tensorflow_datasets \
        --manual_dir ~/downloads/firerisk        # likewise utkface, expw, wflw, galaxy10_decals
    python -m experiments.study --config experiments/configs/paper.py:base=hf,path=~/vit-b16 \
        --workdir ./workdir_paper

`base=hf` reads a Hugging Face ViTModel folder (e.g. google/vit-base-patch16-224-in21k saved
with `save_pretrained`), `base=bigvision` a big_vision / vision_transformer .npz
(e.g. ViT-B_16.npz); `path` is that folder or file. Other arguments: seeds (default 3), steps
(default 2000 per run), data_dir, manual_dir.

Tasks: firerisk (3 classes), utkface_age_class (9 age bins) and utkface_age (age regression)
on the same UTKFace images, expw (7 expressions), wflw (98 landmarks), galaxy10 (10 classes):
four face tasks (similar images) and two dissimilar ones, the paper's design.

Planned for one accelerator of the A100 / TPU v4 class (bfloat16 compute, batch 64): an
adapter run of 2,000 steps is about 128k images at ViT-B/16 cost (~53 GFLOP per image for
forward and backward), a few minutes at 40 TFLOP/s sustained; 12 runs per seed and 245 merges
scored on the eval splits (~20k images per seed and method-combo set) put the whole 3-seed study
at roughly 5 to 6 hours, mostly merge evaluation on FireRisk's 21k validation images. These are
estimates from FLOP counts, not measurements: this suite cannot run on the CPU machine the
offline suite was measured on (no accelerator, no data), but it runs the same code
(`experiments/study.py`), which the offline suite and tests/test_experiments.py exercise.
"""

import ml_collections

from experiments.configs import offline
from jaxmerge import config_lib

KNOWN = {"seeds", "steps", "base", "path", "data_dir", "manual_dir"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg)
    if args.keys() - KNOWN:
        raise ValueError(
            f"paper.py: unknown arguments {sorted(args.keys() - KNOWN)}; known: {sorted(KNOWN)}"
        )
    c = offline.get_config(f"seeds={args.get('seeds', 3)}")
    c.suite = "paper"
    c.tasks = ("utkface_age_class", "utkface_age", "expw", "wflw", "firerisk", "galaxy10")
    c.image_groups = {
        "utkface_age_class": "faces",
        "utkface_age": "faces",
        "expw": "faces",
        "wflw": "faces",
        "firerisk": "aerial",
        "galaxy10": "galaxies",
    }
    t = c.train
    t.base.source = args.get("base", "hf")
    if t.base.source not in ("hf", "bigvision"):
        raise ValueError(f"paper.py: base={t.base.source!r}; allowed: hf, bigvision")
    t.base.path = args.get("path", "~/models/vit-base-patch16-224-in21k")
    t.model.variant, t.model.image_size = "B/16", 224
    t.model.overrides = ml_collections.ConfigDict(
        {"depth": 0, "width": 0, "mlp_dim": 0, "num_heads": 0}
    )
    if t.base.source == "hf":  # Hugging Face ViT conventions
        t.model.layer_norm_eps, t.model.pooler = 1e-12, False
    t.model.dtype = "bfloat16"
    t.data_dir = args.get("data_dir", "")
    t.manual_dir = args.get("manual_dir", "")
    t.steps = int(args.get("steps", 2000))
    t.warmup_steps = t.steps // 10
    t.batch_size = 64
    t.eval_batch_size = 256
    t.learning_rate = 1e-3
    t.crop_padding = 8
    t.lora.rank = 16
    t.lora.alpha = 16.0
    t.lora.targets = "qv"
    t.head.hidden = 256
    t.log_every = 50
    t.checkpoint_every = 500
    return c
