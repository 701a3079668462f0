"""Training-mode BatchNorm statistics are global across devices (pmap and jit).

Runs in a subprocess with 4 simulated CPU devices (the device count is fixed when
JAX starts). A batch of 8 split over 4 devices must give exactly what one
device gives on the whole batch: the same outputs and the same updated
running statistics.
"""

from helpers import run_on_simulated_devices

SCRIPT = r"""
import functools, jax, jax.numpy as jnp, numpy as np
import qscore_jax
from jax.sharding import NamedSharding, PartitionSpec as P
from qscore_jax.models import build_model, abstract_variables
assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
shapes = abstract_variables(build_model('resnet18', stem='cifar'), (1, 16, 16, 3))
variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) * 0.3, shapes)
images = rng.standard_normal((8, 16, 16, 3)).astype(np.float32)

single = build_model('resnet18', stem='cifar')
step = lambda m, v, x: m.apply(v, x, train=True, mutable=['batch_stats'])
out, stats = jax.jit(functools.partial(step, single))(variables, images)

# pmap: each device sees 2 images; BatchNorm averages over the 'batch' axis.
mapped = build_model('resnet18', stem='cifar', bn_axis_name='batch')
p_out, p_stats = jax.pmap(functools.partial(step, mapped), axis_name='batch',
                          in_axes=(None, 0))(variables, images.reshape(4, 2, 16, 16, 3))
np.testing.assert_allclose(np.asarray(p_out).reshape(8, -1), out, rtol=2e-5, atol=1e-6)
for a, b in zip(jax.tree.leaves(p_stats), jax.tree.leaves(stats)):
  np.testing.assert_allclose(np.asarray(a)[0], b, rtol=2e-5, atol=1e-6)

# jit over a device mesh: the batch is sharded, statistics are global without any axis name.
mesh = jax.make_mesh((4,), ('data',))
sharded = jax.device_put(images, NamedSharding(mesh, P('data')))
j_out, j_stats = jax.jit(functools.partial(step, single))(variables, sharded)
np.testing.assert_allclose(j_out, out, rtol=2e-5, atol=1e-6)
for a, b in zip(jax.tree.leaves(j_stats), jax.tree.leaves(stats)):
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
print('ok')
"""


def test_batchnorm_statistics_are_global_over_devices():
  run_on_simulated_devices(SCRIPT, 4)
