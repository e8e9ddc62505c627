"""RegMean and RegMean++: the closed form against FusionBench's (golden), its special cases,
the Grams of layer inputs against a direct computation, RegMean++'s layer-by-layer order, bad
input, and a merge of a trained run scored end to end."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import layer_inputs, lora, recipes
from jaxmerge.merging import regmean as rm
from jaxmerge.models import vit
from tests import golden_files

MODEL = vit.ViT(**vit.variant("mu/4", image_size=8, depth=2))
BASE = vit.init_params(MODEL, jax.random.key(0))
QV = ("block_0/attention/query", "block_0/attention/value")
QV += ("block_1/attention/query", "block_1/attention/value")
SEED, COUNT = 0, 24


def _adapter(seed, targets="qv"):
    adapter = lora.init_adapter(
        jax.random.key(seed),
        BASE,
        lora.LoraConfig(2, targets=vit.TARGET_PRESETS.get(targets, targets)),
    )
    key = jax.random.key(seed + 50)
    return lora.map_targets(
        lambda n: {**n, "lora_b": jax.random.normal(key, n["lora_b"].shape)}, adapter
    )


def _run(seed, targets="qv", cache=None):
    """A stand-in run: its adapter, and its images put in the recipes' cache."""
    run = types.SimpleNamespace(
        directory=f"run_{seed}",
        adapter=_adapter(seed, targets),
        task=types.SimpleNamespace(train_split="train"),
    )
    images = np.asarray(jax.random.normal(jax.random.key(seed + 90), (COUNT, 8, 8, 3)))
    cache[("inputs", run.directory, COUNT, SEED)] = (images, np.zeros(COUNT))
    return run


def _merge(name, runs, cache, **params):
    merged, record = recipes.merge_runs(
        runs, MODEL, BASE, name, params={"images": COUNT, "batch_size": 16, **params}, cache=cache
    )
    return {p: np.asarray(n["delta"]) for p, n in lora.target_items(merged)}, record


def _deltas(adapter):
    return {p: np.asarray(lora.delta_of(n)) for p, n in lora.target_items(adapter)}


@pytest.mark.parametrize("case", ["clip_default", "gpt2_ratio", "no_reduction"])
@pytest.mark.parametrize("which", ["regmean", "plusplus"])
def test_closed_form_matches_fusionbench(case, which):
    g = golden_files.arrays("regmean.npz")
    merged, rcond = rm.regmean_layer(g[f"{case}/grams"], g[f"{case}/deltas"], g[f"{case}/ratio"])
    assert golden_files.rel_err(merged, g[f"{case}/{which}"]) < 1e-4
    assert float(rcond) > rm.MIN_RCOND
    # The same closed form in float64: FusionBench's float32 inverse of the full weights
    # accounts for nearly all of the difference above (up to 6e-5, ours 3e-7).
    ratio, grams = float(g[f"{case}/ratio"]), g[f"{case}/grams"].astype(np.float64)
    reduced = ratio * grams + (1 - ratio) * np.stack([np.diag(np.diag(x)) for x in grams])
    rhs = np.einsum("tij,tjo->io", reduced, g[f"{case}/deltas"].astype(np.float64))
    assert golden_files.rel_err(merged, np.linalg.solve(reduced.sum(0), rhs)) < 1e-5


def test_special_cases_of_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40, 6))
    grams = np.einsum("tni,tnj->tij", x, x) / 40
    deltas = rng.standard_normal((3, 6, 5))
    # One task: its own update, whatever its Gram.
    one, _ = rm.regmean_layer(grams[:1], deltas[:1], 0.95)
    np.testing.assert_allclose(one, deltas[0], rtol=1e-4, atol=1e-5)
    # Equal Grams: the plain mean of the updates.
    same, _ = rm.regmean_layer(np.stack([grams[0]] * 3), deltas, 0.95)
    np.testing.assert_allclose(same, deltas.mean(0), rtol=1e-4, atol=1e-5)
    # Ratio 0: each input row is the mean weighted by that feature's energy in each task.
    diagonal, _ = rm.regmean_layer(grams, deltas, 0.0)
    energy = np.einsum("tii->ti", grams)
    want = np.einsum("ti,tio->io", energy, deltas) / energy.sum(0)[:, None]
    np.testing.assert_allclose(diagonal, want, rtol=1e-4, atol=1e-5)


def test_a_singular_gram_is_named_not_a_nan():
    grams = np.zeros((2, 4, 4), np.float32)  # all-zero inputs
    deltas = {"block_0/attention/query": np.ones((4, 3), np.float32)}
    with pytest.raises(ValueError, match="'block_0/attention/query'.* singular"):
        rm.regmean_deltas([{"block_0/attention/query": g} for g in grams], [deltas] * 2, 0.95)


def test_grams_of_the_patch_embedding_are_those_of_the_patches():
    images = np.asarray(jax.random.normal(jax.random.key(3), (10, 8, 8, 3)))
    patches = images.reshape(10, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
    # Batches of 4 leave a padded, masked last batch: the mean is over the 10 images only.
    got = layer_inputs.input_grams(MODEL, BASE, _adapter(1), images, ["patch_embed", *QV], 4)
    assert golden_files.rel_err(got["patch_embed"], patches.T @ patches / len(patches)) < 1e-5
    whole = layer_inputs.input_grams(MODEL, BASE, _adapter(1), images, QV, 10)
    for path in QV:
        assert golden_files.rel_err(got[path], whole[path]) < 1e-5


def test_one_run_merges_to_its_own_update():
    cache = {}
    run = _run(1, cache=cache)
    for name in ("regmean", "regmean_plusplus"):
        merged, record = _merge(name, [run], cache)
        want = _deltas(run.adapter)
        assert sorted(merged) == sorted(want) and record["reads"] == "unlabeled"
        for path in want:
            assert golden_files.rel_err(merged[path], want[path]) < 1e-4


def test_regmean_plusplus_takes_each_block_s_grams_with_earlier_blocks_merged():
    cache = {}
    runs = [_run(1, cache=cache), _run(2, cache=cache)]
    plain, _ = _merge("regmean", runs, cache)
    plus, _ = _merge("regmean_plusplus", runs, cache)
    block_0 = [p for p in QV if p.startswith("block_0")]
    for path in block_0:  # the first block sees every task's own model in both
        assert golden_files.rel_err(plus[path], plain[path]) < 1e-6
    # The second block, from Grams taken with block 0 merged and block 1 each task's own.
    own = [_deltas(r.adapter) for r in runs]
    for path in QV[2:]:
        grams = []
        for run, deltas in zip(runs, own):
            mixed = {**deltas, **{p: plus[p] for p in block_0}}
            tree = {}
            for p, d in mixed.items():
                tree = lora.set_at(tree, p, {"delta": jnp.asarray(d)})
            images = cache[("inputs", run.directory, COUNT, SEED)][0]
            grams.append(layer_inputs.input_grams(MODEL, BASE, tree, images, [path])[path])
        want, _ = rm.regmean_layer(jnp.stack(grams), jnp.stack([d[path] for d in own]), 0.95)
        assert golden_files.rel_err(plus[path], want) < 1e-4
        assert golden_files.rel_err(plus[path], plain[path]) > 1e-3  # the order matters


def test_runs_with_different_targets_merge_over_the_union():
    cache = {}
    runs = [_run(1, "qv", cache), _run(2, r"attention/query$", cache)]
    merged, _ = _merge("regmean", runs, cache)
    assert sorted(merged) == sorted(QV)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"images": 0}, "images: got 0; allowed: an integer >= 1"),
        ({"batch_size": True}, "batch_size: got True"),
        ({"reduce_non_diagonal_ratio": 1.5}, "reduce_non_diagonal_ratio: got 1.5; allowed"),
        ({"steps": 3}, r"unknown parameter\(s\) \['steps'\]"),
    ],
)
def test_bad_settings_are_refused_before_compute(params, message):
    for name in ("regmean", "regmean_plusplus"):
        with pytest.raises(ValueError, match=message):
            recipes.check(name, params)
    with pytest.raises(ValueError, match="fits its own weights"):
        recipes.check("regmean", {}, [1.0, 1.0])


def test_linearly_dependent_inputs_without_reduction_are_named():
    # The random base's LayerNorms have scale 1 and bias 0: every query input sums to zero.
    cache = {}
    runs = [_run(1, cache=cache), _run(2, cache=cache)]
    with pytest.raises(ValueError, match="'block_0/attention/query'.* singular"):
        _merge("regmean", runs, cache, reduce_non_diagonal_ratio=1.0)
