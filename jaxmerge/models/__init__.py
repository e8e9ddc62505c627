"""Model families by name: each one module under `models/` that registers a `Family`.

    family = models.get("vit")
    model = family.module(**family.variant("Ti/16", image_size=224))
    base = family.init_params(model, jax.random.key(0))

A family's adapted layers are `layers.LoraDense`, so adapters, merging and folding work on it
unchanged; `config.model.family` picks one by name. `load.load_base` builds the model a training
config describes and loads its base parameters.
"""

from jaxmerge.models.registry import FAMILIES, Family, get, register

# Importing a family's module registers it; a new family is one more module and line here.
# isort: off
from jaxmerge.models import vit
from jaxmerge.models import clip
# isort: on

__all__ = ["FAMILIES", "Family", "get", "register", "vit", "clip"]
