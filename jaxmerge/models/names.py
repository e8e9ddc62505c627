"""`NameMap`: one two-way table between a family's parameter paths and Hugging Face's names.

    names = models.get("clip").names
    names.theirs("block_3/attention/query", "v5")          # 'encoder.layers.3.self_attn.q_proj'
    names.ours("vision_model.encoder.layers.3.self_attn.q_proj")   # 'block_3/attention/query'

The same table reads checkpoints and PEFT adapters (`ours`) and writes them (`theirs`), so a
name cannot be right one way and wrong the other.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Module names of a family in transformers, per naming (e.g. "v4", "v5").

    Attributes:
      layers: {naming: the prefix of the numbered blocks}, e.g. {"v4": "encoder.layer"}.
      blocks: {path inside `block_N/`: {naming: module name inside `<layers>.N.`}}.
      top: {path outside the blocks: module name}, the same in every naming.
      strip: prefixes a reader removes first (e.g. "vit." of ViTForImageClassification).
      prefix: {naming: what the bare model's module names start with}, for a naming where
        they have one (CLIPVisionModel's "vision_model." in transformers 4.x; none in 5.x).
      classifier_prefix: the same in the family's image classification model (with the
        classifier PEFT saves as `modules_to_save`), or None when transformers has no such
        model reading the feature jaxmerge's heads read.
      without_classifier: paths that classification model lacks (ViT's pooler).
      peft_targets: a regex (full match) of the paths PEFT LoRA can adapt (its linear layers).
    """

    layers: Mapping[str, str]
    blocks: Mapping[str, Mapping[str, str]]
    top: Mapping[str, str]
    strip: tuple[str, ...] = ()
    prefix: Mapping[str, str] = dataclasses.field(default_factory=dict)
    classifier_prefix: str | None = None
    without_classifier: tuple[str, ...] = ()
    peft_targets: str = r"block_\d+/(attention/(query|key|value|out)|mlp/(fc1|fc2))"

    @property
    def namings(self) -> tuple[str, ...]:
        return tuple(self.layers)

    def theirs(self, path: str, naming: str) -> str:
        """The module name of jaxmerge path `path` (no prefix), e.g. 'block_2/mlp/fc1' ->
        'layers.2.mlp.fc1'.

        Raises:
          ValueError: an unknown naming, or a path the table does not hold.
        """
        if naming not in self.layers:
            raise ValueError(f"naming={naming!r}; allowed: {self.namings}")
        if path in self.top:
            return self.top[path]
        match = re.fullmatch(r"block_(\d+)/(.+)", path)
        if match is None or match.group(2) not in self.blocks:
            raise ValueError(
                f"path {path!r} has no Hugging Face name; allowed: {sorted(self.top)} and "
                f"block_N/<one of {sorted(self.blocks)}>"
            )
        return f"{self.layers[naming]}.{match.group(1)}.{self.blocks[match.group(2)][naming]}"

    def ours(self, name: str) -> str | None:
        """The jaxmerge path of a module name in any naming, with or without a `strip` prefix,
        or None if it is not one."""
        for prefix in self.strip:
            name = name.removeprefix(prefix)
        for path, module in self.top.items():
            if module == name:
                return path
        for layers in set(self.layers.values()):
            match = re.fullmatch(rf"{re.escape(layers)}\.(\d+)\.(.+)", name)
            if match is None:
                continue
            for path, modules in self.blocks.items():
                if match.group(2) in modules.values():
                    return f"block_{match.group(1)}/{path}"
        return None

    def prefix_for(self, naming: str) -> str:
        """The bare model's module name prefix in `naming` ("" for none)."""
        return self.prefix.get(naming, "")

    def is_peft_target(self, path: str) -> bool:
        return re.fullmatch(self.peft_targets, path) is not None
