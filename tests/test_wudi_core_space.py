"""WUDI against FusionBench 0.2.33's own wudi_merging (tests/golden/wudi.npz)."""

import jax.numpy as jnp
import pytest

from jaxmerge import lora, merging
from tests import golden_files as gf

GOLDEN = gf.arrays("wudi.npz")
PATHS = sorted({k.split("/", 1)[1].rsplit("/", 1)[0] for k in GOLDEN if k.startswith("task_0/")})


def golden_adapters():
    adapters = []
    for t in range(3):
        adapter = {}
        for path in PATHS:
            node = {k: jnp.asarray(GOLDEN[f"task_{t}/{path}/{k}"]) for k in lora.FACTORS}
            adapter = lora.set_at(adapter, path, node)
        adapters.append(adapter)
    return adapters


@pytest.mark.parametrize("case", ["default", "steps_40"])
def test_wudi_equals_fusionbench(case):
    params = {} if case == "default" else {"steps": int(GOLDEN[f"{case}/steps"])}
    merged = merging.merge(golden_adapters(), "wudi", **params)
    for path in PATHS:
        want = GOLDEN[f"{case}/merged/{path}"]
        assert gf.rel_err(lora.get_at(merged, path)["delta"], want) < 1e-4, path
