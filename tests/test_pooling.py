"""models.pooling.max_pool equals flax's max_pool (reduce_window), values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qscore_jax.models.pooling import max_pool


@pytest.mark.parametrize('size,window,strides,padding', [
    (16, (3, 3), (2, 2), ((1, 1), (1, 1))),   # torchvision's stem pool
    (16, (3, 3), (2, 2), 'SAME'),             # TF/Haiku, even input
    (15, (3, 3), (2, 2), 'SAME'),             # odd input
    (9, (2, 3), (1, 2), 'VALID'),
])
def test_values_and_gradients_equal_reduce_window(size, window, strides, padding):
  rng = np.random.default_rng(0)
  # After a ReLU many windows tie at 0: the first maximum must get the gradient.
  x = jnp.asarray(np.maximum(rng.standard_normal((3, size, size, 5)), 0).astype(np.float32))
  reference = lambda v: nn.max_pool(v, window, strides, padding=padding)
  ours = lambda v: max_pool(v, window, strides, padding)
  want, want_vjp = jax.vjp(reference, x)
  got, got_vjp = jax.vjp(ours, x)
  np.testing.assert_array_equal(got, want)
  grad = jnp.asarray(rng.standard_normal(want.shape).astype(np.float32))
  # Overlapping windows add their gradients in another order: float tolerance.
  np.testing.assert_allclose(got_vjp(grad)[0], want_vjp(grad)[0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda v: ours(v).sum() * 2))(x),
                             jax.grad(lambda v: reference(v).sum() * 2)(x), atol=1e-6)


def test_nan_propagates_and_bfloat16_works():
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(jnp.nan)
  out = max_pool(x, (2, 2), (2, 2))
  assert np.isnan(out[0, 0, 0, 0]) and not np.isnan(out[0, 1, 1, 0])
  x16 = jnp.arange(16, dtype=jnp.bfloat16).reshape(1, 4, 4, 1)
  assert max_pool(x16, (2, 2), (2, 2)).dtype == jnp.bfloat16
  grad = jax.grad(lambda v: max_pool(v, (2, 2), (2, 2)).astype(jnp.float32).sum())(x16)
  np.testing.assert_array_equal(np.asarray(grad, np.float32).reshape(4, 4),
                                [[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]])


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='NHWC'):
    max_pool(jnp.zeros((4, 4, 1)), (2, 2), (2, 2))
  with pytest.raises(ValueError, match='floating-point'):
    max_pool(jnp.zeros((1, 4, 4, 1), jnp.int32), (2, 2), (2, 2))
