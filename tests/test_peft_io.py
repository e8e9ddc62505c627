"""PEFT adapter import/export: scales, name spellings, heads, round trips and bad inputs.

Output parity with PEFT itself is in test_parity.py; these tests check the trees."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import lora, merging
from jaxmerge.interop import peft as peft_io
from jaxmerge.interop import peft_export

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def load(name: str, folder: str = "adapters"):
    return peft_io.load_peft_adapter(os.path.join(GOLDEN, folder, name))


def assert_same_tree(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def scales(adapter) -> dict[str, float]:
    return {path: float(node["scale"]) for path, node in lora.target_items(adapter)}


def test_plain_adapter_layout():
    adapter, head, config = load("a")
    assert head is None and config["r"] == 4
    assert [p for p, _ in lora.target_items(adapter)] == [
        "block_0/attention/query",
        "block_0/attention/value",
        "block_1/attention/query",
        "block_1/attention/value",
    ]
    assert set(scales(adapter).values()) == {2.0}  # lora_alpha / r = 8 / 4
    node = adapter["block_0"]["attention"]["query"]
    assert node["lora_a"].shape == (32, 4) and node["lora_b"].shape == (4, 32)


def test_rslora_scale():
    adapter, _, config = load("rslora")
    assert config["use_rslora"]
    assert set(scales(adapter).values()) == {8 / math.sqrt(4)}


def test_rank_and_alpha_patterns():
    """rank_pattern {layers.0.attention.o_proj: 2, fc1: 6}, alpha_pattern
    {layers\\.1\\.attention\\.(q|k)_proj: 16, fc2: 3}; r=4, lora_alpha=8 elsewhere."""
    adapter, _, _ = load("patterns")
    want_rank = {"block_0/attention/out": 2, "block_0/mlp/fc1": 6, "block_1/mlp/fc1": 6}
    want_alpha = {"block_1/attention/query": 16, "block_1/attention/key": 16}
    want_alpha.update({"block_0/mlp/fc2": 3, "block_1/mlp/fc2": 3})
    ranks = lora.ranks(adapter)
    assert len(ranks) == 12
    for path, scale in scales(adapter).items():
        rank, alpha = want_rank.get(path, 4), want_alpha.get(path, 8)
        assert ranks[path] == rank, path
        assert scale == pytest.approx(alpha / rank), path


def test_pattern_matching_rule():
    """PEFT's rule: key matches the end of the module name at a '.' boundary; first key wins."""
    assert peft_io.pattern_value({"fc1": 6}, "vit.layers.0.mlp.fc1", 4) == 6
    assert peft_io.pattern_value({"q_proj": 2}, "layers.0.attention.xq_proj", 4) == 4
    assert peft_io.pattern_value({"layers.0.mlp": 2}, "layers.0.mlp.fc1", 4) == 4
    # `output.dense` also matches the attention output, as in PEFT.
    assert peft_io.pattern_value({"output.dense": 3}, "encoder.layer.0.attention.output.dense", 1)
    assert peft_io.pattern_value({"fc.": 1, "fc1": 2}, "layers.0.mlp.fc1", 4) == 1


@pytest.mark.parametrize("name", ("a", "patterns", "cls"))
def test_transformers_v4_names_load_to_the_same_tree(name):
    """adapters_v4/ come from PEFT on transformers 4.57 (`make_golden.py --v4`)."""
    v5_adapter, v5_head, _ = load(name)
    v4_adapter, v4_head, config = load(name, "adapters_v4")
    assert any("query" in m for m in config["target_modules"])
    assert_same_tree(v4_adapter, v5_adapter)
    assert_same_tree(v4_head, v5_head)


def test_modules_to_save_head():
    adapter, head, config = load("cls")
    assert config["modules_to_save"] == ["classifier"]
    assert head["out"]["kernel"].shape == (32, 3) and head["out"]["bias"].shape == (3,)
    assert lora.target_items(adapter)


def mixed_adapter(seed: int = 0):
    """A factored adapter like a merge result: a different rank and scale at every target."""
    rng = np.random.default_rng(seed)
    shapes = {"attention/query": (32, 32), "attention/out": (32, 32), "mlp/fc1": (32, 64)}
    shapes["mlp/fc2"] = (64, 32)
    adapter = {}
    for i in range(2):
        for j, (name, (fan_in, fan_out)) in enumerate(sorted(shapes.items())):
            rank = 1 + (2 * i + j) % 5
            node = {
                "lora_a": jnp.asarray(rng.normal(size=(fan_in, rank)), jnp.float32),
                "lora_b": jnp.asarray(rng.normal(size=(rank, fan_out)), jnp.float32),
                "scale": jnp.asarray(rng.uniform(0.1, 3.0), jnp.float32),
            }
            adapter = lora.set_at(adapter, f"block_{i}/{name}", node)
    adapter = lora.set_at(adapter, "pooler", lora.get_at(adapter, "block_0/attention/out"))
    return adapter


@pytest.mark.parametrize("naming", peft_export.NAMINGS)
@pytest.mark.parametrize("name", ("mixed", "patterns", "cls", "rslora"))
def test_export_import_round_trip(tmp_path, name, naming):
    adapter, head = (mixed_adapter(), None) if name == "mixed" else load(name)[:2]
    peft_export.save_peft_adapter(str(tmp_path), adapter, naming=naming, head=head)
    got, got_head, config = peft_io.load_peft_adapter(str(tmp_path))
    assert_same_tree(got, adapter)
    assert_same_tree(got_head, head)
    assert config["modules_to_save"] == (["classifier"] if head is not None else None)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f) == config


def test_export_names_and_layout(tmp_path):
    from safetensors.numpy import load_file

    adapter, head, _ = load("cls")
    peft_export.save_peft_adapter(str(tmp_path / "v4"), adapter, naming="v4", head=head)
    peft_export.save_peft_adapter(str(tmp_path / "v5"), load("patterns")[0], naming="v5")
    v4 = load_file(str(tmp_path / "v4" / "adapter_model.safetensors"))
    v5 = load_file(str(tmp_path / "v5" / "adapter_model.safetensors"))
    key = "base_model.model.vit.encoder.layer.1.attention.attention.value.lora_A.weight"
    np.testing.assert_array_equal(v4[key], adapter["block_1"]["attention"]["value"]["lora_a"].T)
    assert "base_model.model.classifier.weight" in v4
    assert "base_model.model.layers.0.mlp.fc2.lora_B.weight" in v5
    assert "base_model.model.layers.1.attention.o_proj.lora_A.weight" in v5


def test_export_merged_adapter(tmp_path):
    adapters = [load(n)[0] for n in ("a", "b", "c")]
    merged = merging.merge(adapters, "cat", [0.5, 0.3, 0.2])
    peft_export.save_peft_adapter(str(tmp_path), merged)
    got, _, config = peft_io.load_peft_adapter(str(tmp_path))
    assert config["r"] == 12
    for (_, n1), (_, n2) in zip(lora.target_items(got), lora.target_items(merged)):
        np.testing.assert_allclose(lora.delta_of(n1), lora.delta_of(n2), rtol=1e-6, atol=1e-7)


def test_export_refuses_delta_trees(tmp_path):
    deltas = lora.delta_weights(load("a")[0])
    with pytest.raises(ValueError, match="block_0/attention/query.*factor"):
        peft_export.save_peft_adapter(str(tmp_path), deltas)


def test_export_refuses_to_overwrite(tmp_path):
    adapter = load("a")[0]
    peft_export.save_peft_adapter(str(tmp_path), adapter)
    with pytest.raises(ValueError, match=f"{tmp_path}.*overwrite=True"):
        peft_export.save_peft_adapter(str(tmp_path), load("b")[0])
    assert_same_tree(peft_io.load_peft_adapter(str(tmp_path))[0], adapter)
    peft_export.save_peft_adapter(str(tmp_path), load("b")[0], overwrite=True)
    assert_same_tree(peft_io.load_peft_adapter(str(tmp_path))[0], load("b")[0])


def test_export_bad_arguments(tmp_path):
    adapter = load("a")[0]
    with pytest.raises(ValueError, match="naming='v6'"):
        peft_export.save_peft_adapter(str(tmp_path / "x"), adapter, naming="v6")
    bad = lora.set_at(adapter, "patch_embed", adapter["block_0"]["attention"]["query"])
    with pytest.raises(ValueError, match="'patch_embed'"):
        peft_export.save_peft_adapter(str(tmp_path / "y"), bad)
    mlp_head = {"hidden": {}, "out": {}}
    with pytest.raises(ValueError, match="linear head"):
        peft_export.save_peft_adapter(str(tmp_path / "z"), adapter, head=mlp_head)
    assert not os.listdir(tmp_path)


def copy_adapter(tmp_path, name="patterns") -> str:
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(GOLDEN, "adapters", name), folder)
    return folder


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_import_missing_files(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft_io.load_peft_adapter(str(tmp_path))
    folder = copy_adapter(tmp_path)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"{folder}/adapter_model.safetensors"):
        peft_io.load_peft_adapter(folder)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"peft_type": "LOHA"}, "peft_type='LOHA'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["layernorm"]}, "modules_to_save"),
        ({"rank_pattern": {"fc1": 6}}, "layers.0.attention.o_proj.lora_A/B.weight.*rank.*is 4"),
        ({"r": None}, "r=None"),
    ],
)
def test_import_bad_config(tmp_path, changes, match):
    folder = copy_adapter(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match):
        peft_io.load_peft_adapter(folder)


def test_import_unknown_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_adapter(tmp_path)
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.embeddings.patch_embeddings.projection.lora_A.weight"] = np.zeros(
        (4, 3, 4, 4), np.float32
    )
    tensors["base_model.model.embeddings.patch_embeddings.projection.lora_B.weight"] = np.zeros(
        (32, 4, 1, 1), np.float32
    )
    save_file(tensors, path)
    with pytest.raises(ValueError, match="embeddings.patch_embeddings.projection"):
        peft_io.load_peft_adapter(folder)
    tensors = load_file(os.path.join(GOLDEN, "adapters", "a", "adapter_model.safetensors"))
    tensors["base_model.model.layernorm.weight"] = np.ones(32, np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="layernorm.weight"):
        peft_io.load_peft_adapter(folder)
