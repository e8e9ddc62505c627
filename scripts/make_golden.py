"""Writes the golden files that jaxmerge's parity tests compare against (PyTorch + PEFT).

Run from the repository root, in the torch virtualenv (transformers 5.x, peft, torch CPU, jax):

    cd /work/main && /work/tvenv/bin/python scripts/make_golden.py

and, for the transformers 4.x-named copies of three adapters, in a virtualenv with
transformers<5 and the same peft (e.g. `pip install torch==2.13.0 'transformers<5' peft`):

    cd /work/main && /tmp/t4venv/bin/python scripts/make_golden.py --v4

Everything is seeded, so a rerun rewrites the same numbers up to float32 round-off of the
library versions (PEFT writes target_modules from a set, so their order in adapter_config.json
may change between runs). The default run writes, under tests/golden/:

  hf_vit/                 a tiny random `ViTModel` (hidden 32, 2 layers, 2 heads, mlp 64,
                          image 16, patch 4, with pooler), `save_pretrained` format.
  adapters/<name>/        PEFT LoRA adapters for it, `save_pretrained` format, v5 module names
                          (q_proj, k_proj, v_proj, o_proj, fc1, fc2), all with nonzero lora_B:
                            a, b, c    r=4, lora_alpha=8, targets q_proj+v_proj (3 random draws)
                            rank8      r=8, lora_alpha=8, q_proj+v_proj
                            rslora     r=4, lora_alpha=8, use_rslora, q_proj+v_proj
                            patterns   r=4, lora_alpha=8, all six linear layers of each block,
                                       with rank_pattern and alpha_pattern
                            cls        r=4, lora_alpha=8, q_proj+v_proj on a 3-class
                                       ViTForImageClassification, modules_to_save=["classifier"]
  merges.json             a list of PEFT `add_weighted_adapter` cases, each
                          {"name", "adapters", "weights", "combination_type", "svd_rank",
                          "svd_clamp", "density", "majority_sign_method"}: exactly the arguments
                          passed (null where the argument was None; majority_sign_method is
                          PEFT's default "total" where the method ignores it).
  outputs.npz             float32 arrays under these keys:
    images                                  (2, 16, 16, 3) NHWC inputs (HF gets NCHW).
    base/last_hidden_state                  (2, 17, 32) = jaxmerge `tokens`.
    base/pooler_output                      (2, 32)     = jaxmerge `pooled` with pooler=True.
    adapter/<name>/last_hidden_state        the base with adapter <name> active.
    adapter/<name>/pooler_output            (not for `cls`, whose model has no pooler).
    adapter/cls/logits                      (2, 3) the classifier head of adapter `cls`.
    adapter/<name>/delta/<path>             (rslora and patterns only) PEFT's
                                            `get_delta_weight(...).T`, the (in, out) update
                                            at jaxmerge target <path>, e.g.
                                            block_0/attention/query.
    folded/<name>/last_hidden_state         after `merge_and_unload()` (and pooler_output, or
    folded/<name>/pooler_output             logits for `cls`).
    merge/<name>/delta/<path>               the merged update `(scaling * B @ A).T` (in, out).
    merge/<name>/last_hidden_state          the base with the merged adapter active.

With --v4 it writes adapters_v4/{a,patterns,cls}/: the same adapter values saved by PEFT on a
transformers 4.x model (module names query, key, value, attention.output.dense,
intermediate.dense, output.dense; rank_pattern/alpha_pattern keys renamed accordingly), and
asserts that their outputs equal the v5 goldens.

Export check (default run, needs jaxmerge importable, i.e. jax in this venv): the script loads
adapters with `jaxmerge.interop.peft`, exports them with `save_peft_adapter` to
tests/golden/exported/
(`patterns` in v5 naming, `cls` with its classifier head, `rslora` in v4 naming re-read here
only by jaxmerge, `mixed`, a hand-built adapter with a different rank and scale at every
target, and `merged_ties` / `merged_cat`, merges made by `jaxmerge.merging.merge`),
loads the v5 exports with `PeftModel.from_pretrained` and asserts the outputs equal jaxmerge's
within 1e-4 relative. It prints each check. The test suite re-imports these folders too.

Hugging Face export check (default run, or alone with --hf-export-only): the TIES merge of
a, b, c (weights 0.5, 0.3, 0.2, density 0.5) folded into hf_vit and written by jaxmerge's
`vit.save_hf` (then `hf.save_hf_vit`) to tests/golden/hf_exports/folded_ties_{v4,v5}/,
loaded by transformers'
`ViTModel.from_pretrained`, must give jaxmerge's outputs and PEFT's own merge (ties_total).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join("tests", "golden")  # relative: PEFT records it as base_model_name_or_path
CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
NUM_LABELS = 3
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
# name -> (seed, peft LoraConfig kwargs with v5 module names); `cls` adapts a classifier model.
ADAPTERS = {
    "a": (1, dict(r=4, lora_alpha=8, target_modules=QV)),
    "b": (2, dict(r=4, lora_alpha=8, target_modules=QV)),
    "c": (3, dict(r=4, lora_alpha=8, target_modules=QV)),
    "rank8": (4, dict(r=8, lora_alpha=8, target_modules=QV)),
    "rslora": (5, dict(r=4, lora_alpha=8, target_modules=QV, use_rslora=True)),
    "patterns": (
        6,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=ALL,
            rank_pattern={"layers.0.attention.o_proj": 2, "fc1": 6},
            alpha_pattern={r"layers\.1\.attention\.(q|k)_proj": 16, "fc2": 3},
        ),
    ),
    "cls": (7, dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["classifier"])),
}
V4_ADAPTERS = ("a", "patterns", "cls")
V4_TARGETS = {
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "attention.output.dense",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",  # also matches attention.output.dense, which `patterns` targets too
}
# The v4 spelling of `patterns`' rank/alpha patterns; `output.dense` alone would also match the
# attention output under PEFT's `(.*\.)?(pattern)$` rule, hence the explicit layer prefix.
V4_PATTERNS = {
    "patterns": dict(
        rank_pattern={"encoder.layer.0.attention.output.dense": 2, "intermediate.dense": 6},
        alpha_pattern={
            r"layer\.1\.attention\.attention\.(query|key)": 16,
            r"layer\.\d+\.output\.dense": 3,
        },
    )
}
DELTA_ADAPTERS = ("rslora", "patterns")  # whose per-target updates go to outputs.npz
CASE_FIELDS = ("svd_rank", "svd_clamp", "density", "majority_sign_method")
ABC, W3 = ["a", "b", "c"], [0.5, 0.3, 0.2]
# name, adapters, weights, combination_type, {svd_rank, svd_clamp, density, majority_sign_method}
MERGES = [
    ("cat_ab", ["a", "b"], [1.0, 0.5], "cat", {}),
    ("cat_a_rank8", ["a", "rank8"], [0.7, 0.3], "cat", {}),
    ("cat_a_rslora", ["a", "rslora"], [0.5, 0.5], "cat", {}),
    ("linear_abc", ABC, W3, "linear", {}),
    ("svd_abc", ABC, W3, "svd", {}),
    ("svd_abc_rank2", ABC, W3, "svd", {"svd_rank": 2}),
    ("svd_abc_clamp", ABC, W3, "svd", {"svd_rank": 4, "svd_clamp": 0.9}),
    ("svd_a_rank8", ["a", "rank8"], [0.6, 0.4], "svd", {"svd_rank": 6}),
    ("ties_total", ABC, W3, "ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties_frequency", ABC, W3, "ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    (
        "ties_svd_total",
        ABC,
        W3,
        "ties_svd",
        {"density": 0.5, "svd_rank": 4, "majority_sign_method": "total"},
    ),
    (
        "ties_svd_frequency",
        ABC,
        W3,
        "ties_svd",
        {"density": 0.5, "svd_rank": 4, "majority_sign_method": "frequency"},
    ),
    ("magnitude_prune", ABC, W3, "magnitude_prune", {"density": 0.5}),
    ("magnitude_prune_svd", ABC, W3, "magnitude_prune_svd", {"density": 0.5, "svd_rank": 4}),
]
# transformers 5 module name (inside a block) -> jaxmerge path and transformers 4 module name.
V5_TO_PATH = {
    "attention.q_proj": "attention/query",
    "attention.k_proj": "attention/key",
    "attention.v_proj": "attention/value",
    "attention.o_proj": "attention/out",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
V5_TO_V4 = {
    "layers.": "encoder.layer.",
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def jaxmerge_path(module_name: str) -> str:
    """'vit.layers.1.attention.q_proj' -> 'block_1/attention/query' (v5 names only)."""
    match = re.search(r"layers\.(\d+)\.(.+)$", module_name)
    return f"block_{match.group(1)}/{V5_TO_PATH[match.group(2)]}"


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Replaces HF's tiny init (std 0.02) by O(1)-effect random values, so parity checks bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


def set_lora_weights_(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Nonzero lora_A and lora_B (PEFT initialises B to zero) and a random saved classifier."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                for lora in (module.lora_A[adapter], module.lora_B[adapter]):
                    lora.weight.copy_(0.2 * torch.randn(lora.weight.shape, generator=gen))
            saved = getattr(module, "modules_to_save", None)
            if isinstance(saved, torch.nn.ModuleDict) and adapter in saved:
                for param in saved[adapter].parameters():
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def lora_deltas(model: torch.nn.Module, adapter: str) -> dict[str, np.ndarray]:
    """{jaxmerge path: (in, out) update} of one adapter, from PEFT's own get_delta_weight."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            deltas[jaxmerge_path(name)] = module.get_delta_weight(adapter).detach().numpy().T
    return deltas


def outputs(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(pixel_values=pixels)
    if hasattr(out, "logits"):
        body = model.base_model.model.vit if hasattr(model, "peft_config") else model.vit
        with torch.no_grad():
            hidden = body(pixel_values=pixels).last_hidden_state
        return {"last_hidden_state": hidden.numpy(), "logits": out.logits.numpy()}
    return {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
    }


def base_model(classifier: bool = False):
    """The golden ViTModel, or a ViTForImageClassification with its body (no pooler)."""
    from transformers import ViTForImageClassification, ViTModel

    folder = os.path.join(GOLDEN, "hf_vit")
    if not classifier:
        return ViTModel.from_pretrained(folder).eval()
    model = ViTForImageClassification.from_pretrained(folder, num_labels=NUM_LABELS)
    randomize_(model.classifier, seed=100)
    return model.eval()


def save_pretrained(model: torch.nn.Module, folder: str) -> None:
    """`model.save_pretrained` without PEFT's boilerplate model card."""
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "README.md")):
        os.remove(os.path.join(folder, "README.md"))


def make_base(pixels: torch.Tensor, arrays: dict) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**CONFIG), add_pooling_layer=True).eval()
    randomize_(model, seed=0)
    folder = os.path.join(GOLDEN, "hf_vit")
    save_pretrained(model, folder)
    for key, value in outputs(model, pixels).items():
        arrays[f"base/{key}"] = value


def make_adapters(pixels: torch.Tensor, arrays: dict) -> None:
    from peft import LoraConfig, get_peft_model

    for name, (seed, kwargs) in ADAPTERS.items():
        model = get_peft_model(base_model(classifier=name == "cls"), LoraConfig(**kwargs))
        set_lora_weights_(model, "default", seed)
        model.eval()
        folder = os.path.join(GOLDEN, "adapters", name)
        save_pretrained(model, folder)
        for key, value in outputs(model, pixels).items():
            arrays[f"adapter/{name}/{key}"] = value
        if name in DELTA_ADAPTERS:
            for path, delta in lora_deltas(model, "default").items():
                arrays[f"adapter/{name}/delta/{path}"] = delta
        folded = copy.deepcopy(model).merge_and_unload()
        for key, value in outputs(folded, pixels).items():
            arrays[f"folded/{name}/{key}"] = value
        print(f"adapter {name}: {len(lora_deltas(model, 'default'))} targets, saved to {folder}")


def make_merges(pixels: torch.Tensor, arrays: dict) -> None:
    from peft import PeftModel

    names = sorted({n for _, adapters, *_ in MERGES for n in adapters})
    folder = lambda n: os.path.join(GOLDEN, "adapters", n)  # noqa: E731
    model = PeftModel.from_pretrained(base_model(), folder(names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder(name), adapter_name=name)
    model.eval()
    cases = []
    for name, adapters, weights, combination_type, extra in MERGES:
        case = {"name": name, "adapters": adapters, "weights": weights}
        case["combination_type"] = combination_type
        case.update({f: extra.get(f) for f in CASE_FIELDS})
        case["majority_sign_method"] = case["majority_sign_method"] or "total"
        cases.append(case)
        model.add_weighted_adapter(
            adapters, weights, name, combination_type, **{f: case[f] for f in CASE_FIELDS}
        )
        model.set_adapter(name)
        arrays[f"merge/{name}/last_hidden_state"] = outputs(model, pixels)["last_hidden_state"]
        deltas = lora_deltas(model, name)
        for path, delta in deltas.items():
            arrays[f"merge/{name}/delta/{path}"] = delta
        print(f"merge {name}: {combination_type}, {len(deltas)} targets")
    with open(os.path.join(GOLDEN, "merges.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")


def to_v4(name: str) -> str:
    for new, old in V5_TO_V4.items():
        name = name.replace(new, old)
    return name


def make_v4_adapters(pixels: torch.Tensor) -> None:
    """Re-saves adapters a, patterns and cls with transformers 4.x module names."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    if transformers.__version__.startswith("5"):
        raise SystemExit("--v4 needs transformers<5 (see the module docstring)")
    golden = dict(np.load(os.path.join(GOLDEN, "outputs.npz")))
    for name in V4_ADAPTERS:
        _, kwargs = ADAPTERS[name]
        targets = [V4_TARGETS[m] for m in kwargs["target_modules"]]
        kwargs = dict(kwargs, target_modules=targets, **V4_PATTERNS.get(name, {}))
        model = get_peft_model(base_model(classifier=name == "cls"), LoraConfig(**kwargs)).eval()
        saved = load_file(os.path.join(GOLDEN, "adapters", name, "adapter_model.safetensors"))
        state = {to_v4(k): torch.from_numpy(v) for k, v in saved.items()}
        with torch.no_grad():
            for key, param in model.named_parameters():
                key = key.replace(".default", "").replace(".modules_to_save", "")
                if key in state:
                    param.copy_(state.pop(key))
        if state:
            raise SystemExit(f"v4 model has no parameters for {sorted(state)}")
        folder = os.path.join(GOLDEN, "adapters_v4", name)
        save_pretrained(model, folder)
        for key, value in outputs(model, pixels).items():
            err = rel_err(value, golden[f"adapter/{name}/{key}"])
            print(f"v4 adapter {name} {key}: rel err {err:.2e} vs the v5 golden")
            assert err < 1e-5, (name, key, err)


def export_check(pixels: torch.Tensor, images: np.ndarray) -> None:
    """jaxmerge's save_peft_adapter -> PeftModel.from_pretrained gives jaxmerge's outputs."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from peft import PeftModel

    from jaxmerge import lora, merging
    from jaxmerge.interop import peft as peft_io
    from jaxmerge.interop import peft_export
    from jaxmerge.models import vit

    vit_kwargs, params, _ = vit.load_hf(os.path.join(GOLDEN, "hf_vit"))
    model = vit.ViT(**vit_kwargs)
    apply = jax.jit(lambda adapter: model.apply({"params": params, "lora": adapter}, images))
    exported = os.path.join(GOLDEN, "exported")
    shutil.rmtree(exported, ignore_errors=True)

    adapters = {}
    for name in ("patterns", "rslora"):
        adapters[name] = peft_io.load_peft_adapter(os.path.join(GOLDEN, "adapters", name))[0]
    adapters["cls"], head, _ = peft_io.load_peft_adapter(os.path.join(GOLDEN, "adapters", "cls"))
    # Every target a different rank and scale: the shape of a merged (factored) adapter.
    rng = np.random.default_rng(0)
    mixed = lora.map_targets(
        lambda n: {
            "lora_a": jnp.asarray(
                rng.normal(0, 0.3, (n["lora_a"].shape[0], r := rng.integers(1, 7)))
            ).astype(jnp.float32),
            "lora_b": jnp.asarray(rng.normal(0, 0.3, (r, n["lora_b"].shape[1]))).astype(
                jnp.float32
            ),
            "scale": jnp.asarray(rng.uniform(0.3, 3.0), jnp.float32),
        },
        adapters["patterns"],
    )
    adapters["mixed"] = mixed
    load = lambda n: peft_io.load_peft_adapter(os.path.join(GOLDEN, "adapters", n))[0]  # noqa: E731
    adapters["merged_ties"] = merging.merge([load(n) for n in ABC], "ties", W3, density=0.5)
    adapters["merged_cat"] = merging.merge([load("a"), load("rank8")], "cat", [0.7, 0.3])
    for name, adapter in adapters.items():
        naming = "v4" if name == "rslora" else "v5"
        folder = os.path.join(exported, name)
        peft_export.save_peft_adapter(
            folder, adapter, naming=naming, head=head if name == "cls" else None
        )
        if naming == "v4":
            again = peft_io.load_peft_adapter(folder)[0]
            err = max(
                rel_err(lora.delta_of(n1), lora.delta_of(n2))
                for (_, n1), (_, n2) in zip(lora.target_items(adapter), lora.target_items(again))
            )
            print(f"export check {name} (v4 names): jaxmerge re-import delta rel err {err:.2e}")
            assert err < 1e-6
            continue
        peft = PeftModel.from_pretrained(base_model(classifier=name == "cls"), folder).eval()
        want = dict(apply(adapter))
        got = outputs(peft, pixels)
        pairs = [("last_hidden_state", "tokens"), ("pooler_output", "pooled")]
        if name == "cls":
            want["logits"] = want["tokens"][:, 0] @ head["out"]["kernel"] + head["out"]["bias"]
            pairs[1] = ("logits", "logits")
        for key, ours in pairs:
            err = rel_err(got[key], want[ours])
            print(f"export check {name}: PEFT {key} vs jaxmerge {ours}: rel err {err:.2e}")
            assert err < 1e-4, (name, key, err)


def hf_export_check(pixels: torch.Tensor, images: np.ndarray) -> None:
    """jaxmerge's `vit.save_hf` of a folded TIES merge -> `ViTModel.from_pretrained` gives
    jaxmerge's outputs (both tensor namings), and PEFT's own TIES merge (ties_total)."""
    sys.path.insert(0, ROOT)
    import jax
    from transformers import ViTModel

    from jaxmerge import lora, merging
    from jaxmerge.interop import peft as peft_io
    from jaxmerge.models import vit

    vit_kwargs, params, _ = vit.load_hf(os.path.join(GOLDEN, "hf_vit"))
    load = lambda n: peft_io.load_peft_adapter(os.path.join(GOLDEN, "adapters", n))[0]  # noqa: E731
    merged = merging.merge([load(n) for n in ABC], "ties", W3, density=0.5)
    folded = lora.fold_into_base(params, merged)
    want = jax.jit(vit.ViT(**vit_kwargs).apply)({"params": folded}, images)
    peft_merge = np.load(os.path.join(GOLDEN, "outputs.npz"))["merge/ties_total/last_hidden_state"]
    for naming in vit.HF_NAMES.namings:
        folder = os.path.join(GOLDEN, "hf_exports", f"folded_ties_{naming}")
        shutil.rmtree(folder, ignore_errors=True)
        vit.save_hf(folder, vit_kwargs, folded, naming)
        got = outputs(ViTModel.from_pretrained(folder).eval(), pixels)
        for key, ours in (("last_hidden_state", "tokens"), ("pooler_output", "pooled")):
            err = rel_err(got[key], want[ours])
            print(f"HF export ({naming} names): transformers {key} vs jaxmerge: rel err {err:.2e}")
            assert err < 1e-4, (naming, key, err)
        err = rel_err(got["last_hidden_state"], peft_merge)
        print(f"HF export ({naming} names): transformers vs PEFT's ties merge: rel err {err:.2e}")
        assert err < 1e-4, (naming, err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--v4", action="store_true", help="write adapters_v4/ (transformers<5)")
    parser.add_argument("--skip-export", action="store_true", help="no jaxmerge export check")
    parser.add_argument(
        "--hf-export-only", action="store_true", help="only the Hugging Face export check"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(ROOT)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if args.v4:
        make_v4_adapters(pixels)
        return
    if args.hf_export_only:
        hf_export_check(pixels, images)
        return
    os.makedirs(GOLDEN, exist_ok=True)
    arrays = {"images": images}
    make_base(pixels, arrays)
    make_adapters(pixels, arrays)
    make_merges(pixels, arrays)
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    np.savez_compressed(os.path.join(GOLDEN, "outputs.npz"), **arrays)
    print(f"wrote {len(arrays)} arrays to {os.path.join(GOLDEN, 'outputs.npz')}")
    if not args.skip_export:
        export_check(pixels, images)
        hf_export_check(pixels, images)


if __name__ == "__main__":
    main()
