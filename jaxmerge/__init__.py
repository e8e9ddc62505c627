"""jaxmerge: multi-task vision models by merging LoRA adapters, in pure JAX.

The public API, re-exported here (the modules keep the full set):

    import jaxmerge as jm

    adapter = jm.init_adapter(key, base, jm.LoraConfig(rank=8)  # the query and value layers)
    merged = jm.merging.merge([adapter_a, adapter_b], "ties", [0.5, 0.5], density=0.5)
    backbone = jm.fold_into_base(base, merged)

Where things live: `lora` (adapter trees), `merging` (merge methods by name), `models` (model
families by name: `models.vit`), `interop` (Hugging Face, big_vision and PEFT files),
`datasets` (builders that prepare raw files), `input_pipeline` (prepared datasets to batches),
`tasks` and `heads` (what each task learns and how it is scored), `training`, `evaluation`,
`merge_folder`, `prediction` (the library under the commands), `model_folder` (merged
multi-task models), `commands` (`python -m jaxmerge COMMAND`: the thin command-line layer).
"""

__version__ = "0.1.0"

from jaxmerge import lora, merging, models  # noqa: E402
from jaxmerge.lora import (  # noqa: E402
    LoraConfig,
    delta_weights,
    fold_into_base,
    init_adapter,
    unfold_from_base,
)
from jaxmerge.merging import METHODS  # noqa: E402
from jaxmerge.models.vit import ViT  # noqa: E402

__all__ = [
    "METHODS",
    "LoraConfig",
    "ViT",
    "delta_weights",
    "fold_into_base",
    "init_adapter",
    "lora",
    "merging",
    "models",
    "unfold_from_base",
]
