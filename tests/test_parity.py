"""Parity with PyTorch transformers + PEFT on the golden files of scripts/make_golden.py.

Tolerances are relative to the largest reference value (`rel_err`); float32 on both sides
reaches about 1e-6, the checks allow 1e-4.
"""

from __future__ import annotations

import functools
import os

import golden_files
import jax
import numpy as np
import pytest
from golden_files import rel_err

from jaxmerge import lora, merging
from jaxmerge.interop import peft as peft_io
from jaxmerge.models import vit

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ADAPTERS = ("a", "b", "c", "rank8", "rslora", "patterns", "cls")
TOL = 1e-4


def golden() -> dict[str, np.ndarray]:
    return golden_files.arrays()


@functools.cache
def base():
    vit_kwargs, params, head = vit.load_hf(os.path.join(GOLDEN, "hf_vit"))
    model = vit.ViT(**vit_kwargs)
    return model, params, jax.jit(lambda variables: model.apply(variables, golden()["images"]))


@functools.cache
def adapter(name: str, folder: str = "adapters"):
    return peft_io.load_peft_adapter(os.path.join(GOLDEN, folder, name))


def reference(prefix: str, name: str) -> dict[str, np.ndarray]:
    """{jaxmerge output name: golden array} for one model of the golden file."""
    refs = {"tokens": golden()[f"{prefix}/{name}/last_hidden_state"]}
    if name == "cls":
        refs["logits"] = golden()[f"{prefix}/{name}/logits"]
    else:
        refs["pooled"] = golden()[f"{prefix}/{name}/pooler_output"]
    return refs


def with_logits(out: dict, head) -> dict:
    """Adds the classifier's logits; HF's classifier reads the final-normed class token."""
    out = dict(out)
    if head is not None:
        out["logits"] = out["tokens"][:, 0] @ head["out"]["kernel"] + head["out"]["bias"]
    return out


def test_base_matches_hf():
    _, params, apply = base()
    out = apply({"params": params})
    assert rel_err(out["tokens"], golden()["base/last_hidden_state"]) < TOL
    assert rel_err(out["pooled"], golden()["base/pooler_output"]) < TOL


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_matches_peft(name):
    _, params, apply = base()
    tree, head, _ = adapter(name)
    out = with_logits(apply({"params": params, "lora": tree}), head)
    for key, want in reference("adapter", name).items():
        assert rel_err(out[key], want) < TOL, key


@pytest.mark.parametrize("name", ADAPTERS)
def test_golden_adapters_change_the_output(name):
    """Otherwise the parity tests could not tell a lost adapter from a correct one."""
    want = reference("adapter", name)["tokens"]
    assert rel_err(want, golden()["base/last_hidden_state"]) > 0.1


@pytest.mark.parametrize("name", ADAPTERS)
def test_folded_matches_merge_and_unload(name):
    _, params, apply = base()
    tree, head, _ = adapter(name)
    out = with_logits(apply({"params": lora.fold_into_base(params, tree)}), head)
    for key, want in reference("folded", name).items():
        assert rel_err(out[key], want) < TOL, key


@pytest.mark.parametrize("name", ("rslora", "patterns"))
def test_adapter_deltas_match_peft(name):
    tree, _, _ = adapter(name)
    items = lora.target_items(lora.delta_weights(tree))
    prefix = f"adapter/{name}/delta/"
    assert sorted(p for p, _ in items) == sorted(
        k[len(prefix) :] for k in golden() if k.startswith(prefix)
    )
    for path, node in items:
        assert rel_err(node["delta"], golden()[prefix + path]) < 1e-6, path


@pytest.mark.parametrize("name", ("a", "patterns", "cls"))
def test_transformers_v4_adapter_matches(name):
    """adapters_v4/ were saved by PEFT on a transformers 4.x model (`make_golden.py --v4`)."""
    _, params, apply = base()
    tree, head, config = adapter(name, "adapters_v4")
    assert "query" in " ".join(config["target_modules"])
    out = with_logits(apply({"params": params, "lora": tree}), head)
    for key, want in reference("adapter", name).items():
        assert rel_err(out[key], want) < TOL, key


@pytest.mark.parametrize("name", ("patterns", "cls", "mixed", "merged_ties", "merged_cat"))
def test_exported_folders_reimport(name):
    """tests/golden/exported/ was written by save_peft_adapter and checked against PEFT by
    make_golden.py; re-reading it must give what PEFT computed from the source adapters."""
    folder = os.path.join(GOLDEN, "exported", name)
    tree, head, config = peft_io.load_peft_adapter(folder)
    if name in ("patterns", "cls"):
        source, source_head, _ = adapter(name)
        assert (head is None) == (source_head is None)
        for (p1, n1), (p2, n2) in zip(lora.target_items(tree), lora.target_items(source)):
            assert p1 == p2
            np.testing.assert_allclose(lora.delta_of(n1), lora.delta_of(n2), rtol=1e-6, atol=1e-7)
        _, params, apply = base()
        out = with_logits(apply({"params": params, "lora": tree}), head)
        for key, want in reference("adapter", name).items():
            assert rel_err(out[key], want) < TOL, key
    elif name == "mixed":  # a random rank and scale per target: all must survive the export
        assert len(set(lora.ranks(tree).values())) > 2
        assert len({float(n["scale"]) for _, n in lora.target_items(tree)}) == 12
        assert config["rank_pattern"] and config["alpha_pattern"]
    else:
        abc = [adapter(n)[0] for n in ("a", "b", "c")]
        if name == "merged_ties":
            want = merging.merge(abc, "ties", [0.5, 0.3, 0.2], density=0.5)
        else:
            want = merging.merge([adapter("a")[0], adapter("rank8")[0]], "cat", [0.7, 0.3])
        for (p1, n1), (p2, n2) in zip(lora.target_items(tree), lora.target_items(want)):
            assert p1 == p2
            np.testing.assert_allclose(lora.delta_of(n1), lora.delta_of(n2), rtol=1e-5, atol=1e-6)
