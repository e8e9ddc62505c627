"""CLIP's text tower (flax linen): Hugging Face `CLIPTextModel` and its `text_projection`.

    kwargs, params, extras = load_hf("clip-vit-base-patch32")   # a CLIPModel folder
    out = TextTower(**kwargs).apply({"params": params}, input_ids, attention_mask)

The maths of transformers' `CLIPTextTransformer`: token plus position embeddings, `depth`
pre-norm blocks of causal self-attention (`blocks.Block`, given a mask), a final
LayerNorm, the feature at each prompt's end-of-text token, then `projection` (no bias). Padding
tokens (attention_mask 0) are masked as keys, as transformers does; with causal attention and
padding on the right they cannot change the pooled feature anyway.

`out` holds `tokens` (B, T, width), HF's `last_hidden_state` (after the final LayerNorm),
`pooled` (B, width), HF's `pooler_output`, and with `projection_dim > 0` `text_embeds`
(B, projection_dim), what `CLIPModel.get_text_features` returns.

Parameter paths: token_embedding (vocab, width), pos_embedding (1, max_length, width),
block_N/{norm1, attention/{query, key, value, out}, norm2, mlp/{fc1, fc2}}, encoder_norm,
projection/kernel. The block paths are the image towers'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmerge.interop import clip_text as text_io
from jaxmerge.interop import files
from jaxmerge.models import clip
from jaxmerge.models.blocks import ACTIVATIONS, LayerNorm, encoder_blocks
from jaxmerge.models.names import NameMap

# transformers' names of the text tower inside `text_model.`: the image towers' blocks.
HF_NAMES = NameMap(
    layers=clip.HF_NAMES.layers,
    blocks=clip.HF_NAMES.blocks,
    top={"encoder_norm": "final_layer_norm"},
    strip=("text_model.",),
    prefix={"v4": "text_model.", "v5": "text_model."},
)

# The eos_token_id of the configs saved before transformers PR #24773 (openai's own CLIP
# checkpoints among them): transformers then pools at the largest token id instead.
LEGACY_EOS_TOKEN_ID = 2


def end_of_text(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) the position each prompt is pooled at, as transformers 5's `CLIPTextTransformer`:
    the first `eos_token_id`; with the legacy `eos_token_id == 2`, the first largest id (CLIP's
    end-of-text token is the last of its vocabulary)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def causal_mask(length: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """(B or 1, 1, T, T) boolean: query i may attend to key j <= i that is not padding
    (`attention_mask` (B, T), 1 for tokens and 0 for padding, as tokenizers return it)."""
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is None:
        return allowed
    return allowed & (jnp.asarray(attention_mask) > 0)[:, None, None, :]


class TextTower(nn.Module):
    """CLIP's text encoder. Call with `input_ids` (B, T) int and optionally `attention_mask`
    (B, T); T may be at most `max_length`.

    Attributes:
      vocab_size, max_length: the token and position embedding tables' sizes.
      width, depth, mlp_dim, num_heads, layer_norm_eps, activation: as the image towers'.
      projection_dim: > 0 adds `text_embeds = pooled @ projection`; 0 for none.
      eos_token_id: the end-of-text token id of the config (see `end_of_text`).
      dtype, lora_dropout, lora_compute, kernels: as in `vit.ViT`.
    """

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 512
    depth: int = 12
    mlp_dim: int = 2048
    num_heads: int = 8
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    projection_dim: int = 512
    eos_token_id: int = 49407
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TextTower.activation: got {self.activation!r}; allowed: {ACTIVATIONS}"
            )
        batch, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(
                f"TextTower: prompts of {length} tokens; allowed: at most max_length="
                f"{self.max_length} (the position embeddings)"
            )
        embed = nn.initializers.normal(stddev=0.02)
        tokens = self.param("token_embedding", embed, (self.vocab_size, self.width))
        positions = self.param("pos_embedding", embed, (1, self.max_length, self.width))
        x = jnp.take(tokens, input_ids, axis=0) + positions[:, :length]
        x = encoder_blocks(self, x, train, self.activation, causal_mask(length, attention_mask))
        x = LayerNorm(self.layer_norm_eps, self.kernels, name="encoder_norm")(x)
        pooled = x[jnp.arange(batch), end_of_text(input_ids, self.eos_token_id)]
        out = {"pooled": pooled.astype(jnp.float32), "tokens": x.astype(jnp.float32)}
        if self.projection_dim:
            projection = nn.Dense(
                self.projection_dim, use_bias=False, dtype=self.dtype, name="projection"
            )
            out["text_embeds"] = projection(pooled).astype(jnp.float32)
        return out


def init_params(model: TextTower, key: jax.Array, length: int = 8) -> dict:
    """Random parameters for `model` (tests)."""
    ids = jnp.zeros((1, min(length, model.max_length)), jnp.int32)
    return jax.jit(model.init)(key, ids)["params"]


def check_params(kwargs: dict, params, source: str, names: dict | None = None) -> None:
    """Raises a ValueError naming the first text tensor missing, extra or of the wrong shape."""
    model = TextTower(**kwargs)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    files.check_shapes(expected, params, source, names, "this text tower")


def load_hf(folder: str, *, dtype=jnp.float32) -> tuple[dict, dict, dict]:
    """Loads the text tower of a Hugging Face `CLIPModel` folder (config.json, safetensors).

    Returns:
      (kwargs, params, extras): `TextTower(**kwargs)` is the tower, `params` its tree in
      `dtype`, `extras` the rest of what zero-shot classification needs, as float32 numpy:
      `logit_scale` (a scalar; CLIP's temperature is its exp) and `visual_projection`
      (width of the image tower, projection_dim), as (in, out).

    Raises:
      ValueError: a missing file, a config without a text tower, an unknown activation or
        tensor, a missing one, or a tensor whose shape does not match the config (naming it).
    """
    source = f"Hugging Face checkpoint {folder!r}"
    kwargs, params, extras, names = text_io.read_hf_clip_text(folder, HF_NAMES)
    check_params(kwargs, params, source, names)
    for key in ("logit_scale", "visual_projection"):
        if key not in extras:
            raise ValueError(f"{source}: tensor {key!r} is missing")
    if extras["visual_projection"].shape[1] != kwargs["projection_dim"]:
        raise ValueError(
            f"{source}: tensor 'visual_projection.weight' projects to "
            f"{extras['visual_projection'].shape[1]}; the config implies "
            f"projection_dim={kwargs['projection_dim']}"
        )
    return kwargs, files.as_jax(params, dtype), extras
