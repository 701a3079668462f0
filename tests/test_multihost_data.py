"""Two processes x 4 simulated devices: every example read exactly once, batches aligned.

Each process runs jax.distributed on localhost, reads its shard of a 37-image
folder (shards of 18 and 19) through eval_batches with a global batch of 16,
lays every batch out on the 8-device mesh, and computes a global masked count
with jit. The parent checks the union of ids, the padding and the batch counts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

WORKER = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from qscore_jax.data import eval_batches
from qscore_jax.models import get_preprocessing
from qscore_jax.parallel import data_mesh, global_batch
assert jax.device_count() == 8 and jax.local_device_count() == 4
batches = eval_batches('folder:' + sys.argv[3], 'train', batch_size=16,
                       preprocessing=get_preprocessing('cifar'), image_size=8)
mesh = data_mesh()
count = jax.jit(lambda m: jnp.sum(m.astype(jnp.int32)))
ids, masks, global_counts, shapes = [], [], [], []
for batch in batches:
  g = global_batch(batch, mesh)
  shapes.append(list(g['image'].shape))
  assert len(g['image'].sharding.device_set) == 8
  global_counts.append(int(count(g['mask'])))
  ids += batch['id'].tolist()
  masks += batch['mask'].tolist()
print(json.dumps({'num_batches': batches.num_batches, 'ids': ids, 'masks': masks,
                  'global_counts': global_counts, 'shapes': shapes}))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_every_example_once(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(37):
    folder = tmp_path / 'images' / f'class{i % 3}'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  address = f'127.0.0.1:{_free_port()}'
  workers = [subprocess.Popen([sys.executable, '-c', WORKER, address, str(i),
                               str(tmp_path / 'images')], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for worker in workers:
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))

  assert results[0]['num_batches'] == results[1]['num_batches'] == 3  # ceil(19 / 8)
  ids = np.array(results[0]['ids'] + results[1]['ids'])
  masks = np.array(results[0]['masks'] + results[1]['masks'])
  np.testing.assert_array_equal(np.sort(ids[masks]), np.arange(37))  # exactly the split
  assert (ids[~masks] == -1).all() and (~masks).sum() == 2 * 3 * 8 - 37
  assert all(shape == [16, 8, 8, 3] for r in results for shape in r['shapes'])
  # A dataset-level count over the global arrays is exact on both processes.
  assert results[0]['global_counts'] == results[1]['global_counts']
  assert sum(results[0]['global_counts']) == 37
