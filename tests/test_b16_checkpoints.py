"""Real checkpoint layouts at real size: ViT-B/16 (google/vit-base-patch16-224-in21k's config).

The Hugging Face `ViTModel` and `ViTForImageClassification` folders are written here with the
real key names from seeded weights (`b16_weights`, never committed) and loaded with
`jaxmerge.interop.hf`; the same weights in big_vision's augreg layout through
`jaxmerge.interop.bigvision`; and a PEFT adapter trained on the classifier
(tests/golden/b16/peft_adapter) through `jaxmerge.interop.peft`. References: PyTorch
transformers and PEFT on the same weights and images (scripts/make_golden_b16.py,
tests/golden/b16/outputs.npz).
"""

import os

import b16_weights
import golden_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_files import rel_err

from jaxmerge import heads, lora
from jaxmerge.interop import peft
from jaxmerge.models import vit

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "b16")
B16 = dict(
    width=768,
    depth=12,
    mlp_dim=3072,
    num_heads=12,
    patch_size=16,
    image_size=224,
    channels=3,
    pool="cls",
    layer_norm_eps=1e-12,
    gelu_approximate=False,
)
# float32 through 12 layers, summed in another order than PyTorch's: measured 2e-6 relative.
RTOL = 1e-4


def golden(key):
    return golden_files.arrays("b16")[key]


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(b16_weights.images(2))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(kwargs, params, head) of the seeded ViTModel folder, loaded by jaxmerge."""
    folder = b16_weights.write_hf(str(tmp_path_factory.mktemp("vit_model")), "ViTModel", seed=0)
    return vit.load_hf(folder)


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    folder = b16_weights.write_hf(
        str(tmp_path_factory.mktemp("vit_cls")), "ViTForImageClassification", seed=1
    )
    return vit.load_hf(folder)


def forward(kwargs, params, images, adapter=None):
    variables = {"params": params} | ({"lora": adapter} if adapter is not None else {})
    return jax.jit(vit.ViT(**kwargs).apply)(variables, images)


def test_hf_vit_model_matches_transformers(hf_model, images):
    kwargs, params, head = hf_model
    assert kwargs == {**B16, "pooler": True} and head is None
    assert sum(x.size for x in jax.tree.leaves(params)) == 86_389_248  # ViT-B/16 with pooler
    out = forward(kwargs, params, images)
    assert rel_err(out["tokens"][:, 0], golden("model/cls_token")) < RTOL
    assert rel_err(out["tokens"].mean(1), golden("model/mean_token")) < RTOL
    assert rel_err(out["pooled"], golden("model/pooler_output")) < RTOL


def _logits(kwargs, params, head, images, adapter=None):
    pooled = forward(kwargs, params, images, adapter)["pooled"]
    return heads.MlpHead(0, b16_weights.NUM_LABELS).apply({"params": head}, pooled)


def test_hf_classifier_matches_transformers(hf_classifier, images):
    kwargs, params, head = hf_classifier
    assert kwargs == {**B16, "pooler": False}
    assert head["out"]["kernel"].shape == (768, b16_weights.NUM_LABELS)
    assert rel_err(_logits(kwargs, params, head, images), golden("classifier/logits")) < RTOL


def test_peft_adapter_trained_on_b16_matches_peft(hf_classifier, images):
    kwargs, params, head = hf_classifier
    adapter, adapter_head, config = peft.load_peft_adapter(os.path.join(GOLDEN, "peft_adapter"))
    assert adapter_head is None and config["r"] == 2
    targets = dict(lora.target_items(adapter))
    assert len(targets) == 24 and "block_11/attention/value" in targets
    assert targets["block_0/attention/query"]["lora_a"].shape == (768, 2)
    assert float(np.abs(targets["block_0/attention/query"]["lora_b"]).max()) > 0  # trained
    want = golden("peft/logits")
    assert rel_err(_logits(kwargs, params, head, images, adapter), want) < RTOL
    assert rel_err(_logits(kwargs, params, head, images), want) > 1e-3  # the adapter matters
    folded = lora.fold_into_base(params, adapter)
    assert rel_err(_logits(kwargs, folded, head, images), golden("peft/folded_logits")) < RTOL


def augreg_from_hf(state: dict) -> dict:
    """The same weights in big_vision's (vision_transformer augreg) layout and names."""
    d, h = b16_weights.WIDTH, 12
    t = lambda name: state[name + ".weight"].T  # noqa: E731  (out, in) -> (in, out)
    flat = {
        "embedding/kernel": state["embeddings.patch_embeddings.projection.weight"].transpose(
            2, 3, 1, 0
        ),
        "embedding/bias": state["embeddings.patch_embeddings.projection.bias"],
        "cls": state["embeddings.cls_token"],
        "Transformer/posembed_input/pos_embedding": state["embeddings.position_embeddings"],
        "Transformer/encoder_norm/scale": state["layernorm.weight"],
        "Transformer/encoder_norm/bias": state["layernorm.bias"],
        "pre_logits/kernel": t("pooler.dense"),
        "pre_logits/bias": state["pooler.dense.bias"],
    }
    for i in range(b16_weights.DEPTH):
        hf_block, block = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
        for ours, theirs in (
            ("LayerNorm_0", "layernorm_before"),
            ("LayerNorm_2", "layernorm_after"),
        ):
            flat[f"{block}{ours}/scale"] = state[f"{hf_block}{theirs}.weight"]
            flat[f"{block}{ours}/bias"] = state[f"{hf_block}{theirs}.bias"]
        mha = f"{block}MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            flat[f"{mha}{name}/kernel"] = t(f"{hf_block}attention.attention.{name}").reshape(
                d, h, d // h
            )
            flat[f"{mha}{name}/bias"] = state[f"{hf_block}attention.attention.{name}.bias"].reshape(
                h, d // h
            )
        flat[f"{mha}out/kernel"] = t(f"{hf_block}attention.output.dense").reshape(h, d // h, d)
        flat[f"{mha}out/bias"] = state[f"{hf_block}attention.output.dense.bias"]
        for ours, theirs in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
            flat[f"{block}MlpBlock_3/{ours}/kernel"] = t(hf_block + theirs)
            flat[f"{block}MlpBlock_3/{ours}/bias"] = state[f"{hf_block}{theirs}.bias"]
    return flat


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_bigvision_b16_npz_loads_the_same_model(hf_model, images, tmp_path):
    """A B/16 .npz of the same weights gives the same parameters; with HF's GELU and epsilon
    it gives transformers' outputs; at 384 px its position embeddings are resampled."""
    path = str(tmp_path / "ViT-B_16.npz")
    np.savez(path, **augreg_from_hf(b16_weights.state_dict("ViTModel", seed=0)))
    kwargs, params, head = vit.load_bigvision(path)
    assert head is None
    assert kwargs == {**B16, "pooler": True, "layer_norm_eps": 1e-6, "gelu_approximate": True}
    hf_kwargs, hf_params, _ = hf_model
    jax.tree.map(np.testing.assert_array_equal, params, hf_params)
    out = forward(hf_kwargs, params, images)
    assert rel_err(out["pooled"], golden("model/pooler_output")) < RTOL
    bigger, params_384, _ = vit.load_bigvision(path, image_size=384)
    assert bigger["image_size"] == 384 and params_384["pos_embedding"].shape == (1, 577, 768)
