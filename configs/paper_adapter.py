# ruff: noqa: E501  (the docstring holds runnable one-line commands)
r"""Train one LoRA adapter (or head baseline) of a paper task on ViT-B/16 at 224 px, bfloat16.

    python -m jaxmerge train --config configs/paper_adapter.py:task=wflw,path=$HOME/vit-base-patch16-224-in21k,manual_dir=$HOME/downloads --workdir ./workdir_paper
    python -m jaxmerge train --config configs/paper_adapter.py:task=wflw,mode=head,path=$HOME/vit-base-patch16-224-in21k,manual_dir=$HOME/downloads --workdir ./workdir_paper

The run of one task of `experiments/configs/paper.py` (same settings: 2,000 steps of batch 64,
LoRA r=16 on q and v, AdamW 1e-3, bfloat16 compute with float32 master weights). Arguments:
task (firerisk, utkface_age_class, utkface_age, expw, wflw, galaxy10), mode (lora | head),
base (hf | bigvision | random), path (the checkpoint folder or .npz), data_dir, manual_dir,
steps, dtype (bfloat16 | float32).

Expected per accelerator (arithmetic, see experiments/configs/paper.py for the derivation;
40% of the dense bfloat16 peak; a LoRA step is 72.1 GFLOP an image, a head step 35.4):

  | accelerator | LoRA run: 128k images | head run | memory of a LoRA step, batch 64 |
  |---|---|---|---|
  | A100 40 GB / 80 GB (312 TFLOP/s) | 74 s at 1,730 img/s | 36 s at 3,530 img/s | 5.4 GB activations + 0.4 GB weights (15 GB by XLA:CPU's buffer assignment) |
  | H100 SXM (989 TFLOP/s) | 23 s at 5,490 img/s | 11 s at 11,200 img/s | same |
  | H100 PCIe (756 TFLOP/s) | 31 s at 4,190 img/s | 15 s at 8,540 img/s | same |

plus compiling (~10 s) and the final evaluation. At these rates the input pipeline sets the
pace unless it prepares 1,700 to 11,000 JPEG images a second: threads share Python's lock
(one prepares 620 to 990 a second, two no more), worker processes
(`--config.data_workers=N`) 600 to 860 each (benchmarks/RESULTS.md, 2 cores), so 3 workers
per A100 and 8 (LoRA) to 16 (head) per H100, with a core each.
float32 (`dtype=float32`) runs at TF32 or float32 matmul rates: about half as fast on an A100
and twice the activation memory.
"""

from experiments.configs import paper
from jaxmerge import config_lib

PAPER_ARGS = ("base", "path", "data_dir", "manual_dir", "steps", "dtype")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, {"task", "mode", *PAPER_ARGS}, "configs/paper_adapter.py")
    study = paper.get_config(",".join(f"{k}={args[k]}" for k in PAPER_ARGS if k in args))
    config = study.train
    config.task = args.get("task", "wflw")
    if config.task not in study.tasks:
        raise ValueError(
            f"configs/paper_adapter.py: task={config.task!r}; allowed: {list(study.tasks)}"
        )
    config.mode = args.get("mode", "lora")
    return config
