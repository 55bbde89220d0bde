"""L-BFGS in float64 for strategy optimisation.

Strategy losses (squared sensitivity times error) are ill-conditioned: the
optimal coefficients span several orders of magnitude and float32 stalls
long before convergence. Every optimisation here runs in float64 inside a
scoped ``jax.enable_x64(True)`` context, so the rest of the program keeps
JAX's default float32 (x64 is never switched on globally).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_privacy.matrix_factorization import checks

__all__ = ['CallbackArgs', 'optimize']


class CallbackArgs(NamedTuple):
  """What the optional callback of :func:`optimize` sees after each step.

  Attributes:
    step: number of L-BFGS steps taken so far.
    params: the current parameters (float64 NumPy arrays).
    loss: the current loss value.
    grad_norm: the global L2 norm of the current gradient.
  """

  step: int
  params: Any
  loss: float
  grad_norm: float


def optimize(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    max_optimizer_steps: int = 250,
    grad_norm_tol: float = 1e-10,
    callback: Callable[[CallbackArgs], bool | None] | None = None,
) -> Any:
  """Minimises ``loss_fn`` from ``params`` with L-BFGS (zoom line search).

  Args:
    loss_fn: a differentiable scalar function of the parameter pytree,
      written with ``jax.numpy`` (it is traced in float64).
    params: the initial parameters; converted to float64.
    max_optimizer_steps: at most this many L-BFGS steps (>= 1).
    grad_norm_tol: stop once the gradient norm is below this.
    callback: called after every step with :class:`CallbackArgs`; return
      ``True`` to stop early.

  Returns:
    The best parameters found (lowest finite loss), as float64 NumPy arrays.
  """
  max_optimizer_steps = checks.check_positive_int(
      'max_optimizer_steps', max_optimizer_steps
  )
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    @jax.jit
    def step(params, state):
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(
          grad, state, params, value=value, grad=grad, value_fn=loss_fn
      )
      return optax.apply_updates(params, updates), state, value, grad

    state = solver.init(params)
    best_params, best_loss = params, float(jax.jit(loss_fn)(params))
    for iteration in range(max_optimizer_steps):
      new_params, state, _, _ = step(params, state)
      value = optax.tree_utils.tree_get(state, 'value')
      grad = optax.tree_utils.tree_get(state, 'grad')
      value = float(value)
      grad_norm = float(optax.tree_utils.tree_norm(grad))
      if not np.isfinite(value):
        break
      params = new_params
      if value < best_loss:
        best_params, best_loss = params, value
      if callback is not None and callback(
          CallbackArgs(
              iteration + 1, jax.tree.map(np.asarray, params), value, grad_norm
          )
      ):
        break
      if grad_norm < grad_norm_tol:
        break
    return jax.tree.map(lambda p: np.asarray(p, np.float64), best_params)
