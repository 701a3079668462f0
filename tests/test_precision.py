"""--dtype: bfloat16 computation, float32 everything that is stored or summed (issue 19)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_FINETUNE
from qscore_jax import cli
from qscore_jax.configs.finetune import get_config
from qscore_jax.finetune import loop
from qscore_jax.models import load_encoder, precision
from qscore_jax.store import RepresentationStore, differences


def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert precision.resolve('auto', backend='cpu') == 'float32'
  assert precision.resolve(None, backend='tpu') == precision.resolve('auto', 'gpu') == 'bfloat16'
  assert precision.resolve('bfloat16', backend='cpu') == 'bfloat16'
  assert precision.as_jnp('bfloat16') == jnp.bfloat16 and precision.name_of(None) == 'float32'
  with pytest.raises(ValueError, match="one of auto, float32, bfloat16, got 'float16'"):
    precision.resolve('float16')


def test_a_bfloat16_encoder_computes_in_bfloat16_and_returns_float32():
  encoder = load_encoder('demo-simclr-r18w025', dtype='bfloat16')
  full = load_encoder('demo-simclr-r18w025')
  assert (encoder.compute_dtype, full.compute_dtype) == ('bfloat16', 'float32')
  assert encoder.describe()['compute_dtype'] == 'bfloat16'
  assert encoder.fingerprint == full.fingerprint  # the same weights
  images = np.random.default_rng(0).random((8, 32, 32, 3)).astype(np.float32)
  low, high = np.asarray(encoder.embed(images)), np.asarray(full.embed(images))
  assert low.dtype == np.float32
  relative = np.abs(low - high).max() / np.abs(high).max()
  assert 0 < relative < 0.05, relative  # bfloat16 rounding, not another model


def test_stores_of_two_dtypes_are_never_mixed(tmp_path, tiny_data_dir, capsys):
  common = ['demo-simclr-r18w025', '--dataset', 'synthetic_shapes/tiny', '--split', 'test',
            '--data-dir', tiny_data_dir, '--no-progress', '--batch-size', '64']
  assert cli.main(['embed', *common, '--out', str(tmp_path / 'bf16'), '--dtype', 'bfloat16']) == 0
  store = RepresentationStore.open(tmp_path / 'bf16')
  assert store.metadata['compute_dtype'] == 'bfloat16'
  assert store.representations().dtype == np.float32
  # The same --out with float32 is another run: refused, nothing changed.
  assert cli.main(['embed', *common, '--out', str(tmp_path / 'bf16'), '--dtype', 'float32']) == 2
  assert "compute_dtype: stored 'bfloat16', now 'float32'" in capsys.readouterr().err
  assert RepresentationStore.open(tmp_path / 'bf16').metadata['compute_dtype'] == 'bfloat16'
  # A store written before the field existed computed in float32.
  assert differences({'compute_dtype': 'float32'}, {}, ('compute_dtype',)) == {}
  assert differences({'compute_dtype': 'bfloat16'}, {}, ('compute_dtype',)) == {
      'compute_dtype': ('bfloat16', 'float32')}


def test_finetune_in_bfloat16_keeps_float32_state_and_refuses_another_dtype_on_resume(
    tmp_path, tiny_data_dir, monkeypatch):
  spec = (f'{TINY_FINETUNE},data_dir={tiny_data_dir},method=simclr,num_steps=2,'
          'export_model=false,checkpoint_every_steps=1')
  made = []
  setup = loop.setup
  monkeypatch.setattr(loop, 'setup', lambda *a, **k: made.append(setup(*a, **k)) or made[-1])
  result = loop.run(get_config(spec + ',dtype=bfloat16'), tmp_path / 'run', stop_after=1)
  assert result['step'] == 1 and np.isfinite(result['metrics']['loss'])
  run = json.loads((tmp_path / 'run' / 'run.json').read_text())
  assert run['compute_dtype'] == 'bfloat16'  # resolved: 'auto' would differ by backend
  [built] = made
  assert built.trainer.backbone.dtype == jnp.bfloat16
  import jax  # pylint: disable=import-outside-toplevel
  assert {leaf.dtype for leaf in jax.tree.leaves(built.state.params)} == {np.dtype('float32')}
  assert {leaf.dtype for leaf in jax.tree.leaves(built.state.batch_stats)} <= {
      np.dtype('float32')}
  with pytest.raises(loop.TrainingError, match='dtype'):
    loop.run(get_config(spec + ',dtype=float32'), tmp_path / 'run')
  with pytest.raises(ValueError, match="config field 'dtype' is 'half'"):
    loop.run(get_config(spec + ',dtype=half'), tmp_path / 'other')
