r"""The offline suite: six tasks on data that ships with scikit-learn and scikit-image.

Quickstart (one seed, 13 to 19 min measured on 2 idle CPU cores from a fresh data folder, see
experiments/README.md):

    python -m experiments.study --config experiments/configs/offline.py:seeds=1,learned=quick \
        --workdir ./workdir

The full study (3 seeds, learned merges of pairs and triples and head refits; 46.7 min on 2
quiet CPU cores before the six data-free and RegMean methods were added, 111.9 min with them
on 2 busy shared CPU cores; the results committed under experiments/results/):

    python -m experiments.study --config experiments/configs/offline.py --workdir ./workdir

It mirrors the paper's design on a small ViT pretrained on Fashion-MNIST
(`jaxmerge/assets/fashion_vit`, made by configs/pretrain.py):

  same images     digits (10 classes) and digits_value (the digit as a number, regression),
                  like UTKFace age classes and age regression;
  similar images  digit_box (locate a pasted digit: two box corners, a landmark task like WFLW)
                  joins the two digit tasks, as ExpW and WFLW join UTKFace as faces;
  dissimilar      textures (photo textures), lfw_faces (face or not), photo_scenes
                  (which of eight photographs a crop shows), like FireRisk and Galaxy10.

Arguments (comma-separated key=value after the colon): seeds (number of seeds, default 3),
steps (training steps per run, default 300), base ("random" to use a random backbone instead
of the pretrained one, for the ablation in the README), learned ("all", the default: the
label-free learned merge of pairs and triples, and head refits; "quick": seven methods that
take no gradient step (`QUICK_METHODS`, unless `methods` is given) and the learned merge of
pairs only, no head refit, to keep the quickstart short; "largest": the learned merge of the
largest size only, no head refit, for the scaling curve), sizes (how many adapters each merge
joins, "+"-separated, default "2+3"; "2+3+4+5+6" adds every larger merge up to all six and the
report's `scaling.png`, normalised score against the number of merged adapters), methods (a
"+"-separated subset of the methods below, e.g. "cat+tsv+regmean"; `main_method` is kept),
fusion ("mixture", the default, "none" with learned=quick, or a "+"-separated subset of static,
router and mixture: the fused rows of pairs, triples and all six adapters, `jaxmerge.fuse`;
36 gate fits per seed, a mixture's about 30 s a pair and 50 s a triple on 2 CPU cores). The
supervised and entropy presets of `jaxmerge.recipes` can be added in a copy of this file.
"""

import os

import ml_collections

import jaxmerge
from jaxmerge import config_lib

# The quickstart's methods: seven that take no gradient step (the sum, TIES, three data-free
# methods that lead the committed study at some size, RegMean and RegMean++ on unlabeled
# images) and the learned merge of pairs. Each method costs 35 merges and their scoring.
QUICK_METHODS = (
    "cat",
    "ties",
    "knots",
    "tsv",
    "iso_cts",
    "regmean",
    "regmean_plusplus",
    "learned_output_match",
)
BASE_PATH = os.path.join(os.path.dirname(jaxmerge.__file__), "assets", "fashion_vit")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(
        arg, {"seeds", "steps", "base", "learned", "sizes", "methods", "fusion"}, "offline.py"
    )
    c = ml_collections.ConfigDict()
    c.suite = "offline"
    c.tasks = ("digits", "digits_value", "digit_box", "textures", "lfw_faces", "photo_scenes")
    # Tasks in one group share an image domain; tasks on one dataset share the images too.
    c.image_groups = {
        "digits": "digits",
        "digits_value": "digits",
        "digit_box": "digits",
        "textures": "textures",
        "lfw_faces": "faces",
        "photo_scenes": "photos",
    }
    c.seeds = tuple(range(int(args.get("seeds", 3))))
    c.merge_sizes = config_lib.plus_separated_ints(args.get("sizes", "2+3"), "offline.py: sizes")
    c.methods = {
        "linear": {},
        "cat": {},
        "svd": {},
        "ties": {"density": 0.5},
        "dare_ties": {"density": 0.5},
        "task_arithmetic": {},
        "knots": {"density": 0.5},
        # Data-free spectral and optimised merges (the 2025 frontier, FusionBench parity).
        "iso_c": {},
        "iso_cts": {},
        "tsv": {},
        "wudi": {},
        # The same in Core Space (merging.core_space): each method on the (R, R) per-task cores
        # of the stacked LoRA factors, mapped back (added after the timings above).
        "core_ties_delta": {"density": 0.5},
        "core_iso_c": {},
        "core_iso_cts": {},
        "core_tsv": {},
        "core_wudi": {},
        # Closed form from each layer's input Gram on 256 unlabeled training images per task.
        "regmean": {},
        "regmean_plusplus": {},
        # Learned (jaxmerge.recipes.learned): coefficients fitted on each task's training images.
        "learned_output_match": {},  # label-free; 256 unlabeled images per task
    }
    # Head refit after merging (jaxmerge.refit), reported on rows of its own ("<method>+refit"):
    # it retrains each head on the merged backbone with the task's labels.
    c.refit_methods = ("cat", "learned_output_match")
    c.refit_steps = 300
    learned = args.get("learned", "all")
    if learned not in ("all", "quick", "largest"):
        raise ValueError(f"offline.py: learned={learned!r}; allowed: 'all', 'quick' or 'largest'")
    c.method_sizes = {}
    if learned == "quick":  # the quickstart: label-free learned merges of pairs, no refit
        c.method_sizes = {"learned_output_match": (2,)}
        c.refit_methods = ()
        if "methods" not in args:
            c.methods = {m: p for m, p in c.methods.items() if m in QUICK_METHODS}
    if learned == "largest":  # the scaling curve: one learned merge of the largest size
        c.method_sizes = {"learned_output_match": (max(c.merge_sizes),)}
        c.refit_methods = ()
    c.main_method = "cat"  # PEFT's exact sum of the updates, the plainest merge
    if "methods" in args:
        chosen = [m for m in args["methods"].split("+") if m]
        unknown = sorted(set(chosen) - set(c.methods))
        if unknown:
            raise ValueError(
                f"offline.py: methods={unknown}; allowed: a '+'-separated subset of "
                f"{sorted(c.methods)}"
            )
        keep = {*chosen, c.main_method}
        c.methods = {m: p for m, p in c.methods.items() if m in keep}
        c.refit_methods = tuple(m for m in c.refit_methods if m in keep)
        c.method_sizes = {m: s for m, s in c.method_sizes.items() if m in keep}
    c.merge_weight = 1.0  # every adapter enters a merge with this weight
    # Fusion rows (jaxmerge.fuse, `merge --fuse`): the adapters kept apart in one backbone with
    # gates fitted label-free on the same 256 unlabeled images per task; pairs, triples and all
    # six. The mixture gating by default: it scored highest and fits in one pass (a router
    # refits static gates first). Left out of the quickstart, whose time budget they would double.
    fusion = args.get("fusion", "none" if learned == "quick" else "mixture")
    gatings = [g for g in fusion.split("+") if g and g != "none"]
    if fusion != "none" and (not gatings or set(gatings) - {"static", "router", "mixture"}):
        raise ValueError(
            f"offline.py: fusion={fusion!r}; allowed: 'none' or a '+'-separated subset of "
            "static, router and mixture"
        )
    c.fusion = {g: {} for g in gatings}
    c.fusion_sizes = (2, 3, len(c.tasks))

    t = config_lib.base_config()  # each run's config: task, mode and seed are set per run
    if args.get("base", "pretrained") == "random":
        t.base.source = "random"
        t.model.variant, t.model.image_size = "Ti/7", 28
        t.model.overrides.update(width=128, depth=6, mlp_dim=512, num_heads=4)
    else:
        t.base.source, t.base.path = "checkpoint", BASE_PATH
    t.steps = int(args.get("steps", 300))
    t.warmup_steps = t.steps // 10
    t.batch_size = 64
    t.eval_batch_size = 512
    t.learning_rate = 2e-3
    t.weight_decay = 1e-4
    t.crop_padding = 2
    t.lora.rank = 8
    t.lora.alpha = 8.0
    t.lora.targets = "qv"
    t.head.hidden = 256
    t.log_every = 50
    t.checkpoint_every = t.steps
    c.train = t
    return c
