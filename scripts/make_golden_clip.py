"""Writes the CLIP / SigLIP golden files that tests/test_clip.py compares against.

Run from the repository root, in the torch virtualenv (transformers 5.x, peft, torch CPU):

    cd /work/main && /work/torch_venv/bin/python scripts/make_golden_clip.py

Everything is seeded. It writes, under tests/golden/clip/:

  clip_vision/          a tiny random `CLIPVisionModel` (hidden 32, 2 layers, 2 heads, mlp 64,
                        image 16, patch 4, quick_gelu), `save_pretrained` format.
  clip_vision_proj/     the same weights as `CLIPVisionModelWithProjection` (projection 24).
  clip_model/           a tiny random `CLIPModel` (that vision tower, a 1-layer text tower) with
                        a tiny character-level CLIP tokenizer: what a real checkpoint folder
                        such as openai/clip-vit-base-patch32 holds.
  peft_qv/              a PEFT LoRA adapter (r=4, alpha 8, q_proj + v_proj, nonzero B) on
                        `clip_vision`.
  siglip_vision/        a tiny random `SiglipVisionModel` (MAP head, gelu_pytorch_tanh), HF format.
  siglip.npz            the same SigLIP weights in big_vision naming: params/img/embedding,
                        pos_embedding, Transformer/encoderblock_N/{LayerNorm_0,
                        MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
                        MlpBlock_0/Dense_0,1}, Transformer/encoder_norm, MAPHead_0/{probe,
                        MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}; per-head
                        (D, H, hd) attention kernels, as big_vision saves them.
  zero_shot.npz         the zero-shot heads of `clip_model` for two made-up tasks, written by
                        scripts/make_zero_shot_heads.py's `zero_shot_arrays` (one template,
                        so that CLIPModel's own logits_per_image is the reference).
  outputs.npz           float32: images (2, 16, 16, 3) NHWC; clip/{last_hidden_state,
                        pooler_output}; clip_proj/{last_hidden_state, image_embeds};
                        peft/{last_hidden_state, pooler_output}; siglip/{last_hidden_state,
                        pooler_output}; zero_shot/<task>/logits (CLIPModel.logits_per_image).

    cd /work/main && /work/torch_venv/bin/python scripts/make_golden_clip.py text

writes only the text tower's golden file from the existing `clip_model` folder (nothing else
is regenerated):

  text_outputs.npz      prompts (`TEXT_PROMPTS`) through `clip_model`'s tokenizer
                        (padding=True): input_ids, attention_mask (int32); float32
                        last_hidden_state,
                        pooler_output, text_embeds (`get_text_features`) and
                        legacy_eos/pooler_output (the same model with eos_token_id 2, pooled at
                        the largest token id as transformers does for such configs).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join("tests", "golden", "clip")
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    num_channels=3,
)
PROJECTION = 24
# Two made-up tasks for the zero-shot file; the tokenizer knows printable ASCII characters.
ZERO_SHOT = {"shapes": ["circle", "square", "triangle"], "pets": ["cat", "dog"]}
ZERO_SHOT_TEMPLATE = "a photo of a {}."
# Prompts of different lengths, with capitals, runs of spaces, digits and quotes.
TEXT_PROMPTS = (
    "a photo of a circle.",
    "A  Photo of the   DOG!",
    'the number: "7".',
    "x",
)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """O(1)-effect random values in place of HF's tiny init, so that parity checks bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = any(n in name for n in ("layer_norm", "layrnorm", "layernorm"))
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("logit_scale"):
                param.copy_(torch.tensor(np.log(10.0)))
            else:
                param.copy_(std * noise)


def save(model, folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "README.md")):
        os.remove(os.path.join(folder, "README.md"))


def tiny_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges) over printable ASCII."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for code in range(ord("!"), ord("~") + 1):
            vocab[chr(code) + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def to_bigvision(state: dict, heads: int) -> dict[str, np.ndarray]:
    """A SiglipVisionModel state dict in big_vision's `params/img/...` naming and layouts."""
    s = {k: v.detach().numpy().astype(np.float32) for k, v in state.items()}
    width = s["post_layernorm.weight"].shape[0]
    head_dim = width // heads
    out = {}

    def dense(prefix, name, attention=None):
        kernel, bias = s[f"{name}.weight"].T, s[f"{name}.bias"]
        if attention == "in":  # (D, D) -> (D, H, hd); bias (H, hd)
            kernel, bias = kernel.reshape(width, heads, head_dim), bias.reshape(heads, head_dim)
        elif attention == "out":  # (D, D) -> (H, hd, D)
            kernel = kernel.reshape(heads, head_dim, width)
        out[f"{prefix}/kernel"], out[f"{prefix}/bias"] = kernel, bias

    def norm(prefix, name):
        out[f"{prefix}/scale"], out[f"{prefix}/bias"] = s[f"{name}.weight"], s[f"{name}.bias"]

    img = "params/img"
    patch = s["embeddings.patch_embedding.weight"]  # (D, C, p, p) -> (p, p, C, D)
    out[f"{img}/embedding/kernel"] = patch.transpose(2, 3, 1, 0)
    out[f"{img}/embedding/bias"] = s["embeddings.patch_embedding.bias"]
    out[f"{img}/pos_embedding"] = s["embeddings.position_embedding.weight"][None]
    layers = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layers."))
    for i in range(layers):
        block, hf = f"{img}/Transformer/encoderblock_{i}", f"encoder.layers.{i}"
        norm(f"{block}/LayerNorm_0", f"{hf}.layer_norm1")
        norm(f"{block}/LayerNorm_1", f"{hf}.layer_norm2")
        for jm, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            dense(f"{block}/MultiHeadDotProductAttention_0/{jm}", f"{hf}.self_attn.{name}", "in")
        dense(f"{block}/MultiHeadDotProductAttention_0/out", f"{hf}.self_attn.out_proj", "out")
        dense(f"{block}/MlpBlock_0/Dense_0", f"{hf}.mlp.fc1")
        dense(f"{block}/MlpBlock_0/Dense_1", f"{hf}.mlp.fc2")
    norm(f"{img}/Transformer/encoder_norm", "post_layernorm")
    head = f"{img}/MAPHead_0"
    out[f"{head}/probe"] = s["head.probe"]
    in_w, in_b = s["head.attention.in_proj_weight"], s["head.attention.in_proj_bias"]
    for i, jm in enumerate(("query", "key", "value")):
        s[f"head.{jm}.weight"] = in_w[i * width : (i + 1) * width]
        s[f"head.{jm}.bias"] = in_b[i * width : (i + 1) * width]
        dense(f"{head}/MultiHeadDotProductAttention_0/{jm}", f"head.{jm}", "in")
    dense(f"{head}/MultiHeadDotProductAttention_0/out", "head.attention.out_proj", "out")
    norm(f"{head}/LayerNorm_0", "head.layernorm")
    dense(f"{head}/MlpBlock_0/Dense_0", "head.mlp.fc1")
    dense(f"{head}/MlpBlock_0/Dense_1", "head.mlp.fc2")
    out["params/t"] = np.asarray([np.log(10.0)], np.float32)  # text-side keys are ignored
    return out


def main():
    from peft import LoraConfig, get_peft_model
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_zero_shot_heads import zero_shot_arrays

    os.chdir(ROOT)
    os.makedirs(GOLDEN, exist_ok=True)
    torch.manual_seed(0)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    outputs = {"images": images}

    vision_config = CLIPVisionConfig(**VISION, projection_dim=PROJECTION)
    proj = CLIPVisionModelWithProjection(vision_config).eval()
    randomize_(proj, seed=1)
    save(proj, os.path.join(GOLDEN, "clip_vision_proj"))
    plain = CLIPVisionModel(vision_config).eval()
    plain.load_state_dict({k.removeprefix("vision_model."): v for k, v in proj.state_dict().items()
                           if not k.startswith("visual_projection")})  # fmt: skip
    save(plain, os.path.join(GOLDEN, "clip_vision"))
    with torch.no_grad():
        out = plain(pixel_values=pixels)
        outputs["clip/last_hidden_state"] = out.last_hidden_state.numpy()
        outputs["clip/pooler_output"] = out.pooler_output.numpy()
        out = proj(pixel_values=pixels)
        outputs["clip_proj/last_hidden_state"] = out.last_hidden_state.numpy()
        outputs["clip_proj/image_embeds"] = out.image_embeds.numpy()
    np.testing.assert_allclose(
        outputs["clip/last_hidden_state"], outputs["clip_proj/last_hidden_state"], rtol=1e-6
    )

    # PEFT LoRA on the CLIP tower: q_proj and v_proj, nonzero B.
    peft_model = get_peft_model(
        CLIPVisionModel.from_pretrained(os.path.join(GOLDEN, "clip_vision")).eval(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        out = peft_model(pixel_values=pixels)
    outputs["peft/last_hidden_state"] = out.last_hidden_state.numpy()
    outputs["peft/pooler_output"] = out.pooler_output.numpy()
    shutil.rmtree(os.path.join(GOLDEN, "peft_qv"), ignore_errors=True)
    peft_model.save_pretrained(os.path.join(GOLDEN, "peft_qv"))
    readme = os.path.join(GOLDEN, "peft_qv", "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    # A CLIPModel with that vision tower and a tiny text tower, plus its tokenizer.
    tokenizer = tiny_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=PROJECTION,
    )
    clip = CLIPModel(config).eval()
    randomize_(clip, seed=3)
    save(clip, os.path.join(GOLDEN, "clip_model"))
    tokenizer.save_pretrained(os.path.join(GOLDEN, "clip_model"))
    templates = {task: (ZERO_SHOT_TEMPLATE,) for task in ZERO_SHOT}
    arrays = zero_shot_arrays(clip, tokenizer, ZERO_SHOT, templates)
    arrays["model"] = np.asarray("tests/golden/clip/clip_model")
    np.savez(os.path.join(GOLDEN, "zero_shot.npz"), **arrays)
    for task, names in ZERO_SHOT.items():
        prompts = [ZERO_SHOT_TEMPLATE.format(n) for n in names]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = clip(pixel_values=pixels, **tokens).logits_per_image
        outputs[f"zero_shot/{task}/logits"] = logits.numpy()

    # SigLIP: HF folder and the same weights as a big_vision .npz.
    siglip = SiglipVisionModel(
        SiglipVisionConfig(**VISION, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    ).eval()
    randomize_(siglip, seed=4)
    save(siglip, os.path.join(GOLDEN, "siglip_vision"))
    state = {k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items()}
    np.savez(
        os.path.join(GOLDEN, "siglip.npz"), **to_bigvision(state, VISION["num_attention_heads"])
    )
    with torch.no_grad():
        out = siglip(pixel_values=pixels)
    outputs["siglip/last_hidden_state"] = out.last_hidden_state.numpy()
    outputs["siglip/pooler_output"] = out.pooler_output.numpy()

    outputs = {k: np.asarray(v, np.float32) for k, v in outputs.items()}
    np.savez(os.path.join(GOLDEN, "outputs.npz"), **outputs)
    for key, value in sorted(outputs.items()):
        print(f"{key}: {value.shape}")


def write_text_golden() -> None:
    """tests/golden/clip/text_outputs.npz from the committed `clip_model` folder (read only)."""
    from transformers import AutoTokenizer, CLIPModel

    os.chdir(ROOT)
    folder = os.path.join(GOLDEN, "clip_model")
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer(list(TEXT_PROMPTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(**tokens)
        embeds = model.get_text_features(**tokens)
        model.text_model.eos_token_id = 2  # what CLIPTextModel reads from a legacy config
        legacy = model.text_model(**tokens)
    arrays = {
        "prompts": np.asarray(TEXT_PROMPTS),
        "input_ids": tokens["input_ids"].numpy().astype(np.int32),
        "attention_mask": tokens["attention_mask"].numpy().astype(np.int32),
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
        "text_embeds": getattr(embeds, "pooler_output", embeds).numpy(),
        "legacy_eos/pooler_output": legacy.pooler_output.numpy(),
    }
    np.savez(os.path.join(GOLDEN, "text_outputs.npz"), **arrays)
    for key, value in sorted(arrays.items()):
        print(f"{key}: {value.shape} {value.dtype}")


if __name__ == "__main__":
    if sys.argv[1:] == ["text"]:
        write_text_golden()
    else:
        main()
