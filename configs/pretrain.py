r"""Pretrain the offline suite's base ViT from scratch (mode="full") on Fashion-MNIST.

    python -m jaxmerge train --config configs/pretrain.py --workdir /tmp/jm_pretrain
    python -m experiments.export_base /tmp/jm_pretrain/full/fashion_mnist \
        jaxmerge/assets/fashion_vit

Model: width 128, depth 6, MLP 512, 4 heads, patch 7 on 28x28 images (16 patches + a class
token), 1.2 M parameters: small enough that the offline study trains its twelve runs on two CPU
cores in minutes, deep enough that its features transfer (see experiments/README.md for
"LoRA on this base" against "LoRA on a random base"). Data: Fashion-MNIST's 60,000 training
images (Debian's `dataset-fashion-mnist`), random 2-pixel crops and horizontal flips.

Expected: 3,000 steps of batch 128 (6.4 epochs, AdamW, lr 1e-3, cosine) reach 0.870 test
accuracy (measured: 0.8696 on the 10,000 test images) in 29 min on 2 CPU cores shared with
other jobs (about 15 min on idle cores). `experiments.export_base` then keeps only the
base parameters (no optimizer state, 4.7 MB) as a run folder that `config.base.source =
"checkpoint"` loads; that folder ships as `jaxmerge/assets/fashion_vit`.

Arguments (comma-separated key=value after the colon): steps (default 3000), width (128),
depth (6).
"""

from jaxmerge import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg)
    config = config_lib.base_config()
    config.task = "fashion_mnist"
    config.mode = "full"
    config.model.variant = "Ti/7"
    config.model.image_size = 28
    config.model.overrides.width = int(args.pop("width", 128))
    config.model.overrides.depth = int(args.pop("depth", 6))
    config.model.overrides.mlp_dim = 4 * config.model.overrides.width
    config.model.overrides.num_heads = 4
    if args.keys() - {"steps"}:
        raise ValueError(
            f"configs/pretrain.py: unknown arguments {sorted(args.keys() - {'steps'})}; "
            "known: steps, width, depth"
        )
    config.steps = int(args.get("steps", 3000))
    config.batch_size = 128
    config.learning_rate = 1e-3
    config.warmup_steps = min(200, config.steps // 10)
    config.weight_decay = 0.05
    config.crop_padding = 2
    config.head.hidden = 256
    config.log_every = 50
    config.checkpoint_every = 500
    return config
