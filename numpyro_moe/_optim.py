"""A generic optimisation loop: Adam (optax) over a PyTree of variables in one compiled scan.

Used by the AISTATS 2020 expert loss and by the gradient-descent fits; data are arguments of the
compiled program, so it compiles once per shape and loss, not once per call.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

__all__ = ["minimize_adam"]


def minimize_adam(
    loss,
    variables,
    args=(),
    *,
    num_steps: int,
    learning_rate: float,
    cosine_decay: bool = False,
    static=(),
):
    """Minimise ``loss(variables, args, static)`` by ``num_steps`` Adam steps in one compiled scan.

    ``variables`` and ``args`` (the data) are PyTrees of arrays, passed to the compiled program
    rather than baked into it; ``loss`` and ``static`` (hashable settings such as the link) are
    its compile-time constants. With a module-level ``loss`` the program compiles once per shape
    and is reused by later calls. ``learning_rate`` is Adam's step size, held constant, or with
    ``cosine_decay`` decayed along a cosine from it to 1% of it over the run.

    Returns the final variables and the (num_steps,) loss values along the way.
    """
    return _adam_scan(
        variables,
        args,
        jnp.asarray(learning_rate),
        loss=loss,
        num_steps=num_steps,
        cosine_decay=cosine_decay,
        static=static,
    )


@partial(jax.jit, static_argnames=("loss", "num_steps", "cosine_decay", "static"))
def _adam_scan(variables, args, learning_rate, *, loss, num_steps, cosine_decay, static):
    if cosine_decay:
        learning_rate = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01)
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        variables, state = carry
        value, grads = jax.value_and_grad(loss)(variables, args, static)
        updates, state = optimizer.update(grads, state, variables)
        return (optax.apply_updates(variables, updates), state), value

    (variables, _), values = jax.lax.scan(
        step, (variables, optimizer.init(variables)), None, length=num_steps
    )
    return variables, values
