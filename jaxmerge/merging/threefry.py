"""`jax.random.bits(key, (n,), uint32)` for the DARE masks, written so that XLA:CPU fuses it.

jax lowers its Threefry-2x32 hash on CPU as a rolled loop (5 passes over the whole counter
arrays, to keep compile times short), so 42 M draws, the dense DARE masks of 3 ViT-B adapters,
took 0.4 s on a quiet machine. The same hash written out round by round is one fused
elementwise kernel, 3.5x faster, and gives the same numbers: for a threefry2x32 key under
`jax_threefry_partitionable` (the default since jax 0.5), the i-th draw is
`x1 ^ x2` with `(x1, x2) = threefry2x32(key_data, (i >> 32, i & 0xffffffff))`. Other key
implementations, and jax's older non-partitionable layout, go through `jax.random.bits`.
`tests/test_merge.py` checks the equality against `jax.random.bits` for several keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

U32 = jnp.uint32
# Threefry-2x32 (Salmon et al. 2011, Random123): rotation constants and the key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
    return (x << U32(distance)) | (x >> U32(32 - distance))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """The 20-round Threefry-2x32 block function of counters `(x1, x2)` under key `(k1, k2)`."""
    schedule = (k1, k2, k1 ^ k2 ^ U32(_PARITY))
    x1, x2 = x1 + schedule[0], x2 + schedule[1]
    for block in range(5):
        for distance in _ROTATIONS[block % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, distance) ^ x1
        x1 = x1 + schedule[(block + 1) % 3]
        x2 = x2 + schedule[(block + 2) % 3] + U32(block + 1)
    return x1, x2


def _is_fusable(key: jax.Array, count: int) -> bool:
    return (
        jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl="threefry2x32"))
        and jax.config.jax_threefry_partitionable
        and count < 2**32  # the high counter word is then 0
    )


def random_bits(key: jax.Array, count: int) -> jax.Array:
    """`count` uint32 draws, equal to `jax.random.bits(key, (count,), jnp.uint32)`.

    Args:
      key: a `jax.random` key, typed or raw uint32 data (under `vmap`, a batch of them).
      count: how many draws, a Python int.

    Returns:
      A (count,) uint32 array.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key, as jax.random.bits reads it
    if not _is_fusable(key, count):
        return jax.random.bits(key, (count,), U32)
    k1, k2 = jax.random.key_data(key)
    low = jax.lax.iota(U32, count)
    x1, x2 = threefry2x32(k1, k2, jnp.zeros_like(low), low)
    return x1 ^ x2


def uniform_threshold(probability: float) -> int:
    """The integer `T` with `bits < T  <=>  jax.random.uniform(bits) < probability`.

    `jax.random.uniform` keeps the top 23 bits `m = bits >> 9` and returns `m / 2^23`, so
    `u < p` holds for `m < ceil(p 2^23)` (p rounded to float32 first, as the comparison does),
    that is for `bits < ceil(p 2^23) 2^9`. Valid for 0 <= p < 1.
    """
    scaled = float(np.float32(probability)) * 2.0**23
    return int(np.ceil(scaled)) << 9
