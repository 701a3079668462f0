"""Conversion of every published container kind, against PyTorch references.

Each test synthesises a file in a method's exact published layout (see
checkpoint_factories.py), converts it through the public API (which also saves
and reloads it), and compares the pooled representation and every head output
with the reference networks: max relative error <= 1e-4.
"""

import functools
import os
import pathlib

import jax
import numpy as np
import pytest

import checkpoint_factories as factories
from qscore_jax.convert import ConversionError, convert_checkpoint
from qscore_jax.models import load_heads, load_model
from reference_models import max_relative_error

TOLERANCE = 1e-4


def _apply(module, variables, x):
  return np.asarray(jax.jit(module.apply)(variables, x))


def check(synth, converted, *, reload=True):
  """Representation and heads of a conversion equal the reference's."""
  model, variables, heads = converted.model, converted.variables, converted.heads
  if reload:  # what was saved is what was converted
    model, variables, _ = load_model(converted.directory)
    heads = load_heads(converted.directory)
    assert set(heads) == set(converted.heads)
  rep = _apply(model, variables, synth.images)
  assert max_relative_error(rep, synth.representation) < TOLERANCE
  assert set(heads) == set(synth.heads), (set(heads), set(synth.heads))
  for name, expected in synth.heads.items():
    module, head_vars = heads[name]
    inputs = synth.head_inputs.get(name)
    inputs = synth.representation if inputs is None else inputs
    assert max_relative_error(_apply(module, head_vars, inputs), expected) < TOLERANCE, name
  return rep


def convert(synth, tmp_path, **kwargs):
  return convert_checkpoint(file=synth.path, out_dir=tmp_path / 'converted', progress=False,
                            **kwargs)


# ------------------------------------------------------------------ methods

@pytest.mark.parametrize('module_prefix', [True, False])
def test_swav(tmp_path, module_prefix):
  synth = factories.swav(tmp_path, module_prefix=module_prefix)
  converted = convert(synth, tmp_path, model_id='swav-r50-800ep')
  check(synth, converted)
  assert converted.metadata['preprocessing']['std'][0] == 0.228
  assert converted.heads['prototypes'][0].normalize_input


@pytest.mark.parametrize('version,module_prefix', [(1, True), (2, True), (2, False)])
def test_moco(tmp_path, version, module_prefix):
  synth = factories.moco(tmp_path, version=version, module_prefix=module_prefix)
  converted = convert(synth, tmp_path, method='moco', arch='resnet50')
  check(synth, converted)
  dropped = converted.metadata['provenance']['dropped']
  assert any('other MoCo encoder' in reason for reason in dropped)
  assert any('queue' in reason for reason in dropped) and 'optimizer state' in dropped


def test_moco_key_encoder_on_request(tmp_path):
  synth = factories.moco(tmp_path)
  converted = convert(synth, tmp_path, method='moco', submodel='key', save=False)
  key = factories.resnet('resnet50', seed=3)  # the encoder_k of the factory
  expected = factories._forward(key, synth.images)  # pylint: disable=protected-access
  rep = _apply(converted.model, converted.variables, synth.images)
  assert max_relative_error(rep, expected) < TOLERANCE


@pytest.mark.parametrize('kind', ['resnet', 'vit'])
def test_mocov3(tmp_path, kind):
  synth = factories.mocov3(tmp_path, kind=kind)
  converted = convert(synth, tmp_path, method='mocov3')
  check(synth, converted)
  if kind == 'vit':
    assert converted.model.num_heads == 12  # MoCo v3's ViT-S, not DeiT's 6
    assert converted.heads['projector'][0].layers[-1].norm == 'batchnorm_no_affine'


@pytest.mark.parametrize('kind,submodel', [('vit', 'teacher'), ('vit', 'student'),
                                           ('resnet', 'teacher')])
def test_dino_full(tmp_path, kind, submodel):
  synth = factories.dino(tmp_path, kind=kind, full=True, submodel=submodel)
  converted = convert(synth, tmp_path, method='dino', submodel=submodel)
  check(synth, converted)
  assert converted.metadata['provenance']['submodel'] == submodel
  if kind == 'vit':
    assert converted.model.pos_embed_interpolation == 'dino'


@pytest.mark.parametrize('kind', ['vit', 'resnet'])
def test_dino_backbone_only(tmp_path, kind):
  synth = factories.dino(tmp_path, kind=kind, full=False)
  converted = convert(synth, tmp_path, method='dino')
  check(synth, converted)
  with pytest.raises(ConversionError, match='teacher only'):
    convert(synth, tmp_path, method='dino', submodel='student', save=False)


def test_simsiam(tmp_path):
  synth = factories.simsiam(tmp_path)
  converted = convert(synth, tmp_path, model_id='simsiam-r50-100ep')
  check(synth, converted)
  layers = converted.heads['projector'][0].layers
  assert [l.norm for l in layers] == ['batchnorm', 'batchnorm', 'batchnorm_no_affine']
  assert [l.use_bias for l in layers] == [False, False, True]


@pytest.mark.parametrize('method', ['vicreg', 'barlowtwins'])
@pytest.mark.parametrize('full', [True, False])
def test_vicreg_and_barlowtwins(tmp_path, method, full):
  synth = factories.vicreg_or_barlow(tmp_path, method=method, full=full)
  converted = convert(synth, tmp_path, method=method)
  check(synth, converted)
  if full and method == 'barlowtwins':  # the affine-free bn ends the projector
    assert converted.heads['projector'][0].layers[-1].norm == 'batchnorm_no_affine'


@pytest.mark.parametrize('cifar,old_prefix,submodel', [
    (True, False, 'base'), (True, True, 'base'), (False, False, 'momentum')])
def test_solo_learn(tmp_path, cifar, old_prefix, submodel):
  synth = factories.solo(tmp_path, cifar=cifar, old_prefix=old_prefix, submodel=submodel)
  converted = convert(synth, tmp_path, method='solo-learn', arch='resnet18', submodel=submodel)
  check(synth, converted)
  assert converted.model.stem == ('cifar' if cifar else 'imagenet')


def test_simclr_v2_tf1(tmp_path):
  synth = factories.simclr(tmp_path, version=2)
  converted = convert(synth, tmp_path, model_id='simclr-v2-r50x1-sk0')
  check(synth, converted)
  layers = converted.heads['projector'][0].layers
  assert [l.norm for l in layers] == ['batchnorm', 'batchnorm', 'batchnorm_no_shift']
  assert converted.model.pool_padding == 'tf_same' and converted.model.conv_padding == 'torch'
  dropped = converted.metadata['provenance']['dropped']
  assert 'momentum optimizer slots' in dropped
  assert len(converted.metadata['provenance']['source_files']) == 2  # .index + .data


def test_simclr_ema_weights(tmp_path):
  synth = factories.simclr(tmp_path, version=2, submodel='ema')
  converted = convert(synth, tmp_path, method='simclr', submodel='ema', save=False)
  check(synth, converted, reload=False)


def test_simclr_v1_zip(tmp_path):
  synth = factories.simclr(tmp_path, version=1, zipped=True)
  converted = convert(synth, tmp_path, model_id='simclr-v1-r50x1')
  check(synth, converted)


def test_simclr_layer_order_is_numeric_not_lexicographic():
  from qscore_jax.convert.rules import _tf_index  # pylint: disable=import-outside-toplevel
  names = ['conv2d', 'conv2d_1', 'conv2d_10', 'conv2d_2']
  assert sorted(names, key=lambda n: _tf_index(n, 'conv2d')) == [
      'conv2d', 'conv2d_1', 'conv2d_2', 'conv2d_10']


@pytest.mark.parametrize('submodel', ['online', 'target'])
def test_byol_pickle(tmp_path, submodel):
  synth = factories.byol(tmp_path, submodel=submodel)
  converted = convert(synth, tmp_path, model_id='byol-r50x1', submodel=submodel)
  check(synth, converted)


# ------------------------------------------------------------ reproducibility

def test_converting_twice_gives_byte_identical_parameters(tmp_path):
  synth = factories.moco(tmp_path)
  first = convert_checkpoint(file=synth.path, method='moco', out_dir=tmp_path / 'a')
  second = convert_checkpoint(file=synth.path, method='moco', out_dir=tmp_path / 'b')
  _, a, _ = load_model(first.directory)
  _, b, _ = load_model(second.directory)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 100
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert (first.metadata['provenance']['source_sha256']
          == second.metadata['provenance']['source_sha256'])


def test_metadata_records_the_source(tmp_path):
  import hashlib  # pylint: disable=import-outside-toplevel
  synth = factories.dino(tmp_path, kind='vit', full=True)
  # The synthesised ViT has 2 blocks; the registry entry says 12: options override.
  converted = convert(synth, tmp_path, model_id='dino-vits16', arch_options={'depth': 2})
  meta = converted.metadata
  digest = hashlib.sha256(synth.path.read_bytes()).hexdigest()
  assert meta['provenance']['source_sha256'] == digest
  assert meta['provenance']['source_url'].startswith('https://dl.fbaipublicfiles.com/dino/')
  assert meta['model_id'] == 'dino-vits16' and meta['method'] == 'dino'
  assert meta['arch'] == 'vit_small' and meta['arch_options']['num_heads'] == 6
  assert meta['arch_options']['depth'] == 2  # the synthesised file has 2 blocks
  assert meta['preprocessing']['interpolation'] == 'bicubic'
  assert set(meta['heads']) == {'projector', 'prototypes'}
  assert meta['qscore_jax_version']
  assert converted.directory == (tmp_path / 'converted').resolve()
  assert not [p for p in tmp_path.iterdir() if 'partial' in p.name]


# ------------------------------------------------------------- bookkeeping

def test_parts_without_arrays_are_metadata_by_one_rule():
  """Empty containers, numbers, strings, None, Namespaces: metadata, whatever their
  name; arrays (of any rank) stay entries of the flat mapping."""
  import argparse  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from qscore_jax.convert.readers import flatten  # pylint: disable=import-outside-toplevel
  flat = flatten({'state_dict': {'w': torch.ones(2), 'n': torch.tensor(3)},
                  'optimizer': {'state': {0: {'momentum_buffer': torch.zeros(2)}},
                                'param_groups': [{'lr': 0.1, 'params': list(range(20))}]},
                  'lr_schedulers': [], 'callbacks': {}, 'loops': {'fit_loop': {'epoch': 3}},
                  'scaler': None, 'epoch': 200, 'arch': 'resnet50',
                  'args': argparse.Namespace(lr=0.3, out='.')})
  assert sorted(flat) == ['optimizer/state/0/momentum_buffer', 'state_dict/n', 'state_dict/w']
  assert flat.metadata == {
      'optimizer/param_groups': [{'lr': 0.1, 'params': '<20 numbers>'}], 'lr_schedulers': [],
      'callbacks': {}, 'loops': {'fit_loop': {'epoch': 3}}, 'scaler': None, 'epoch': 200,
      'arch': 'resnet50', 'args': {'lr': 0.3, 'out': '.'}}
  assert not flat.neutralised


def _resave(synth, tmp_path, **changes):
  import torch  # pylint: disable=import-outside-toplevel
  obj = torch.load(synth.path, weights_only=True)
  obj.update(changes)
  path = tmp_path / 'resaved' / synth.path.name
  path.parent.mkdir()
  torch.save(obj, path)
  return path


def test_empty_bookkeeping_containers_convert_and_are_summarised(tmp_path):
  """The bug of issue 15: an empty optimizer/scheduler/callbacks container was a leaf
  no drop rule matched, and the file 'was not a moco checkpoint'."""
  import argparse  # pylint: disable=import-outside-toplevel
  synth = factories.moco(tmp_path)
  path = _resave(synth, tmp_path, optimizer={}, lr_schedulers=[], callbacks={}, loops={},
                 optimizer_states=[], scaler=None, note='trained on 8 GPUs',
                 args=argparse.Namespace(arch='resnet50', moco_k=65536, mlp=True))
  converted = convert_checkpoint(file=path, method='moco', out_dir=tmp_path / 'converted',
                                 progress=False)
  check(synth, converted)
  meta = converted.metadata['provenance']['file_metadata']
  assert meta['epoch'] == 200 and meta['arch'] == 'resnet50' and meta['optimizer'] == {}
  assert meta['lr_schedulers'] == [] and meta['note'] == 'trained on 8 GPUs'
  assert meta['args'] == {'arch': 'resnet50', 'moco_k': 65536, 'mlp': True}
  assert converted.metadata['provenance']['neutralised'] == []


def test_an_array_no_rule_explains_is_still_an_error(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  synth = factories.moco(tmp_path)
  path = _resave(synth, tmp_path, optimizer={}, extra=torch.zeros(3))
  with pytest.raises(ConversionError, match=r"neither used nor dropped.*extra \(1\)"):
    convert_checkpoint(file=path, method='moco', save=False, progress=False)
