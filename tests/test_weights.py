"""Saving and loading variables with orbax + metadata: exact round trips, loud failures."""

import json
import os

import jax
import numpy as np
import pytest

from helpers import random_variables
from qscore_jax.models import (Preprocessing, build_model, embed, get_model_spec,
                               load_model, load_variables, save_model)
from qscore_jax.models.weights import read_metadata


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_with_metadata(tmp_path):
  spec = get_model_spec('byol-r50x1')
  model = build_model('resnet18', conv_padding='tf_same', pool_padding='tf_same')
  variables = random_variables(model, (1, 32, 32, 3))
  provenance = {'source_url': spec.url, 'source_sha256': 'ab' * 32, 'submodel': 'online'}
  directory = save_model(tmp_path / 'byol', variables, spec, arch='resnet18',
                         provenance=provenance)
  assert directory.is_absolute()

  loaded_model, loaded, metadata = load_model(directory)
  _assert_bit_equal(loaded, variables)
  assert loaded_model == model
  assert metadata['model_id'] == 'byol-r50x1' and metadata['method'] == 'byol'
  assert metadata['arch'] == 'resnet18'
  assert metadata['arch_options'] == {'conv_padding': 'tf_same', 'pool_padding': 'tf_same'}
  assert Preprocessing.from_json(metadata['preprocessing']) == spec.preprocessing
  assert metadata['provenance'] == provenance
  assert metadata['qscore_jax_version']
  images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(embed(model, variables, images),
                                embed(loaded_model, loaded, images))


def test_vit_round_trip_and_relative_path(tmp_path, monkeypatch):
  model = build_model('vit_small', depth=2, embed_dim=64, num_heads=4, image_size=32)
  variables = random_variables(model, (1, 32, 32, 3))
  monkeypatch.chdir(tmp_path)
  save_model('relative/vit', variables, arch='vit_small',
             arch_options={'depth': 2, 'embed_dim': 64, 'num_heads': 4, 'image_size': 32})
  _, loaded, metadata = load_model('relative/vit')
  _assert_bit_equal(loaded, variables)
  assert metadata['model_id'] is None and metadata['preprocessing'] is None


def test_existing_directory_is_not_overwritten_silently(tmp_path):
  model = build_model('resnet18')
  variables = random_variables(model, (1, 32, 32, 3))
  save_model(tmp_path / 'm', variables, arch='resnet18')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    save_model(tmp_path / 'm', variables, arch='resnet18')
  changed = jax.tree.map(lambda x: x + 1, variables)
  save_model(tmp_path / 'm', changed, arch='resnet18', overwrite=True)
  _assert_bit_equal(load_variables(tmp_path / 'm'), changed)


def test_loading_onto_another_architecture_lists_the_mismatch(tmp_path):
  model = build_model('resnet18')
  save_model(tmp_path / 'm', random_variables(model, (1, 32, 32, 3)), arch='resnet18')
  with pytest.raises(ValueError, match=r'does not fit the model(.|\n)*missing'):
    load_variables(tmp_path / 'm', build_model('resnet50'))
  with pytest.raises(ValueError, match=r"\['conv1'\]\['kernel'\]: file \(7, 7, 3, 64\), "
                     r'model expects \(7, 7, 3, 128\)'):
    load_variables(tmp_path / 'm', build_model('resnet18', width_multiplier=2))


def test_bad_save_and_load_inputs(tmp_path):
  model = build_model('resnet18')
  variables = random_variables(model, (1, 32, 32, 3))
  with pytest.raises(ValueError, match="'params'"):
    save_model(tmp_path / 'a', {'weights': 1}, arch='resnet18')
  with pytest.raises(ValueError, match='not model state'):
    save_model(tmp_path / 'a', {**variables, 'intermediates': {}}, arch='resnet18')
  with pytest.raises(ValueError, match='spec or an arch'):
    save_model(tmp_path / 'a', variables)
  with pytest.raises(TypeError, match='Invalid option'):
    save_model(tmp_path / 'a', variables, arch='resnet18', arch_options={'heads': 3})
  assert not (tmp_path / 'a').exists()  # nothing written by a failed save
  with pytest.raises(FileNotFoundError, match='metadata.json is missing'):
    load_model(tmp_path)
  save_model(tmp_path / 'b', variables, arch='resnet18')
  meta = json.loads((tmp_path / 'b' / 'metadata.json').read_text())
  meta['format_version'] = 99
  (tmp_path / 'b' / 'metadata.json').write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='format_version 99'):
    read_metadata(tmp_path / 'b')
  assert not [p for p in os.listdir(tmp_path / 'b' / 'variables') if 'tmp' in p]


def test_model_references_resolve_to_saved_directories(tmp_path):
  from qscore_jax.models.weights import resolve_model_dir  # pylint: disable=import-outside-toplevel
  model = build_model('resnet18', width_multiplier=0.25)
  saved = save_model(tmp_path / 'run' / 'model', random_variables(model, (1, 32, 32, 3)),
                     arch='resnet18', arch_options={'width_multiplier': 0.25})
  assert resolve_model_dir(saved) == saved
  assert resolve_model_dir(tmp_path / 'run') == saved  # a finetune workdir: its model/
  with pytest.raises(FileNotFoundError, match='neither a saved model directory'):
    resolve_model_dir(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='byol-r50x1 is not converted yet'):
    resolve_model_dir('byol-r50x1')
