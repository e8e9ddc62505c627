r"""The paper's suite: Kesim & Helli 2024's six tasks on a pretrained ViT-B/16.

    python -m jaxmerge prepare --dataset firerisk --data_dir ~/tensorflow_datasets \
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

Before paying for an accelerator, run the whole suite at full size on fake data in minutes
(`dry_run=1`, below; tests/test_paper_dry_run.py runs it in CI on 2 CPU cores):

    python -m jaxmerge.datasets.fakes --out /tmp/fake_downloads --small_eval
    ARG=dry_run=1,base=hf,path=$HOME/vit-b16,data_dir=/tmp/fake_tfds,manual_dir=/tmp/fake_downloads
    python -m experiments.study --config experiments/configs/paper.py:$ARG --workdir /tmp/dry

Other arguments: dtype (default bfloat16: bfloat16 matmuls, float32 master weights, softmax,
LayerNorm statistics, residual stream and losses), base=random (no checkpoint, for dry runs).

Expected cost (arithmetic from FLOPs and bytes, not measured on an accelerator):

  FLOP per 224 px image (XLA's cost analysis; by hand 12 layers x 197 tokens x
  (24 x 768^2 dense + 4 x 197 x 768 attention) x 2 FLOP = 34.9 G, + 0.2 G patch embedding):
    forward (scoring, head finetuning, refit features)   35.4 GFLOP
    LoRA step (forward + input gradients; the frozen      72.1 GFLOP
      base needs no weight gradients)
  images/s at 40% of the dense bfloat16 peak (LoRA step / forward):
    A100 40 GB or 80 GB   312 TFLOP/s   1,730 / 3,530
    H100 SXM              989 TFLOP/s   5,490 / 11,200
    H100 PCIe             756 TFLOP/s   4,190 / 8,540
  memory of a LoRA step at batch 64: base 86.4M float32 = 346 MB (+ 173 MB bfloat16 casts);
    trained 0.84M parameters (LoRA r=16 on q, v: 590k; head: up to 248k) x 16 B (float32
    weight, gradient, Adam mu, nu) = 13 MB; activations kept for the backward pass ~47 x 768
    B per token and layer (float32 residual and LayerNorm, bfloat16 q, k, v and MLP, 12 x 197
    float32 + bfloat16 attention weights) x 197 tokens x 12 layers = 85 MB per image, 5.4 GB
    per batch. XLA:CPU's buffer assignment of the same step, which fuses less than XLA:GPU,
    is 15.1 GB (59 GB at batch 256): batch 64 fits a 40 GB A100 either way.
  the study, per seed: training 6 tasks x 2,000 steps x 64 images x (72.1 + 35.4 GFLOP, LoRA
    and head) = 82.6 PFLOP; scoring 153 passes over every task's eval split (after training,
    adapter removed, 15 merges per task x 10 rows: 8 methods, 2 refits) x 39.7k images
    (FireRisk validation 21.5k, UTKFace test 2 x 2.4k, ExpW 9.2k, WFLW 2.5k, Galaxy10 1.8k)
    x 35.4 GFLOP = 215 PFLOP; learned merges 300 steps x 16 images x 90 task-merges x 72.1
    GFLOP = 31 PFLOP; refits 2 x 90 x 2,048 images x 35.4 GFLOP = 13 PFLOP. 343 PFLOP: 46
    min per seed on an A100 at 40%, 2.3 h for 3 seeds; 15 min per seed on an H100 SXM, 43
    min for 3 seeds. Scorers keep each task's eval images on the device, in bfloat16 (0.3 MB
    an image: 12 GB for the six tasks, most of it FireRisk's validation split), beside ~4 GB
    for a scoring batch of 256: a 40 GB card holds it.
  the input pipeline: training reads 1.5M images per seed; one loader worker process reads,
    decodes, crops, flips and scales 600 to 860 images a second (benchmarks/RESULTS.md, 2 CPU
    cores; threads share Python's lock and barely scale), so an A100's 1,730 LoRA images/s
    takes 3 workers and an H100's 5,490 8 (`--config.train.data_workers=N`, a core each).
"""

import ml_collections

from experiments.configs import offline
from jaxmerge import config_lib

KNOWN = {"seeds", "steps", "base", "path", "data_dir", "manual_dir", "dry_run", "dtype"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN, "paper.py")
    c = offline.get_config(f"seeds={args.get('seeds', 3)}")
    c.suite = "paper"
    # The paper's study merges; fused rows (offline.py's default) would add 36 ViT-B/16 gate
    # fits a seed to the hours estimated above, so this suite leaves them out.
    c.fusion = {}
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
    if t.base.source not in ("hf", "bigvision", "random"):
        raise ValueError(f"paper.py: base={t.base.source!r}; allowed: hf, bigvision, random")
    t.base.path = args.get("path", "~/models/vit-base-patch16-224-in21k")
    t.model.variant, t.model.image_size = "B/16", 224
    t.model.overrides = ml_collections.ConfigDict(
        {"depth": 0, "width": 0, "mlp_dim": 0, "num_heads": 0}
    )
    if t.base.source == "hf":  # Hugging Face ViT conventions
        t.model.layer_norm_eps, t.model.pooler = 1e-12, False
    t.model.dtype = args.get("dtype", "bfloat16")
    t.data_dir = args.get("data_dir", "")
    t.manual_dir = args.get("manual_dir", "")
    # Loader worker processes (see the docstring): --config.train.data_workers=8 on an H100.
    t.data_workers = 0
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
    # Head refits read each task's training examples into memory once per study: all of
    # FireRisk's 70k at 224 px would be 42 GB of float32 images, so a seeded subset.
    c.refit_examples = 2048
    if args.get("dry_run", "0") not in ("0", "1"):
        raise ValueError(f"paper.py: dry_run={args['dry_run']!r}; allowed: 0 or 1")
    if args.get("dry_run") == "1":
        dry_run(c, args)
    return c


def dry_run(c: ml_collections.ConfigDict, args: dict) -> None:
    """The whole study at full model size in minutes: 2 steps a run, one seed, batch = the
    device count, the fixed method `cat` on every pair and triple (and `ties` on the pairs),
    `cat` + head refit (2 steps on a batch of examples), no learned merge (it compiles once per
    combination of heads). Data: `manual_dir` holds the fake downloads of
    `jaxmerge.datasets.fakes` (or real ones); `data_dir` must be given, a scratch folder, so
    that fake datasets are never prepared where real runs read."""
    import jax

    if not args.get("data_dir") or not args.get("manual_dir"):
        raise ValueError(
            "paper.py: dry_run=1 needs data_dir=<a scratch folder> and manual_dir=<the fake "
            "downloads of `python -m jaxmerge.datasets.fakes --out DIR --small_eval`>"
        )
    c.seeds = (0,)
    c.methods = {"cat": {}, "ties": {"density": 0.5}}
    c.method_sizes = {"ties": (2,)}
    c.refit_methods, c.refit_steps = ("cat",), 2
    c.main_method = "cat"
    t = c.train
    t.steps = int(args.get("steps", 2))
    t.warmup_steps = 0
    t.batch_size = t.eval_batch_size = jax.device_count()
    c.refit_examples = t.batch_size  # each refit's features: a forward of these
    t.log_every = t.checkpoint_every = t.steps
    t.tensorboard = False
