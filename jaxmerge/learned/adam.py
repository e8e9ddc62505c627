"""Adam steps inside one `lax.scan`: the optimiser loop of learned merges and head refits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

Tree = Any


def adam_scan(
    loss: Callable[[Tree, jax.Array], jax.Array],
    params: Tree,
    key: jax.Array,
    steps: int,
    learning_rate: float | Mapping[str, float],
    cosine: bool = False,
    project: Callable[[Tree], Tree] | None = None,
) -> tuple[Tree, jax.Array]:
    """`steps` Adam steps on `loss(params, step_key)`, each step with its own key (to draw its
    minibatch); traces under the caller's `jit`.

    Args:
      learning_rate: one step size, or one for each top-level entry of `params` (e.g. gates of
        order 1 beside head weights of order 1/sqrt(width)); Adam's steps have the size of
        the rate whatever the gradient's scale, so parameters of different scales need their own.
      cosine: decay the step size to 0 along a cosine over the steps (large early steps leave
        a high-loss start fast, then settle).
      project: applied after each update (projected Adam: clipping after the update rather
        than inside the loss keeps a gradient for parameters that sit on a bound).

    Returns:
      (params after the last step, the loss before each step (steps,)).
    """

    def adam(rate):
        return optax.adam(optax.cosine_decay_schedule(rate, steps) if cosine else rate)

    if isinstance(learning_rate, Mapping):
        labels = {name: jax.tree.map(lambda _, n=name: n, part) for name, part in params.items()}
        optimizer = optax.multi_transform(
            {name: adam(rate) for name, rate in learning_rate.items()}, labels
        )
    else:
        optimizer = adam(learning_rate)

    def step(carry, step_key):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params, step_key)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params if project is None else project(params), state), value

    (params, _), history = jax.lax.scan(
        step, (params, optimizer.init(params)), jax.random.split(key, steps)
    )
    return params, history
