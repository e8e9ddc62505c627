"""Adam steps inside one `lax.scan`: the optimiser loop of learned merges and head refits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

Tree = Any


def adam_scan(
    loss: Callable[[Tree, jax.Array], jax.Array],
    params: Tree,
    key: jax.Array,
    steps: int,
    learning_rate: float,
    cosine: bool = False,
    project: Callable[[Tree], Tree] | None = None,
) -> tuple[Tree, jax.Array]:
    """`steps` Adam steps on `loss(params, step_key)`, each step with its own key (to draw its
    minibatch); traces under the caller's `jit`.

    Args:
      cosine: decay the step size to 0 along a cosine over the steps (large early steps leave
        a high-loss start fast, then settle).
      project: applied after each update (projected Adam: clipping after the update rather
        than inside the loss keeps a gradient for parameters that sit on a bound).

    Returns:
      (params after the last step, the loss before each step (steps,)).
    """
    schedule = optax.cosine_decay_schedule(learning_rate, steps) if cosine else learning_rate
    optimizer = optax.adam(schedule)

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
