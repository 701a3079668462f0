"""Conversion of files with the complete top-level structure of each release.

The files come from official_layouts.py: the reference networks of
checkpoint_factories.py, saved with every top-level entry the official
training code writes (optimizer states empty and real, schedulers, AMP
scalers, argparse Namespaces, Lightning loops/callbacks/precision state,
pickled references to functions and classes). Each must convert through
``convert_checkpoint`` and match its reference outputs (``check``: 1e-4
relative).
"""

import contextlib

import pytest

import official_layouts as layouts
from qscore_jax.convert.api import NeutralisedObjectWarning
from test_convert import check, convert


def _warns_if(rejected):
  """A file torch's weights-only loader refuses converts with a NeutralisedObjectWarning."""
  return pytest.warns(NeutralisedObjectWarning) if rejected else contextlib.nullcontext()


_top_level = layouts.load_top_level

# Variants whose structure another case of the same release already converts in the default
# run (an absent vs an empty optimizer, a second Lightning version with the same keys) are left
# to `python -m pytest -m slow`: the default run (.ci/run) must stay under ~20 minutes.
SLOW = pytest.mark.slow


# ------------------------------------------------------------------ SwAV

@pytest.mark.parametrize('optimizer,amp', [('empty', False), ('sgd', True)])
def test_swav_training_checkpoint(tmp_path, optimizer, amp):
  synth = layouts.swav_training(tmp_path, optimizer=optimizer, amp=amp)
  assert _top_level(synth.path) == {'epoch', 'state_dict', 'optimizer'} | ({'amp'} if amp else set())
  check(synth, convert(synth, tmp_path, model_id='swav-r50-800ep'))


# ------------------------------------------------------------------ MoCo v1/v2

@pytest.mark.parametrize('version,optimizer', [(1, 'empty'), pytest.param(2, 'absent', marks=SLOW),
                                               (2, 'sgd')])
def test_moco_release(tmp_path, version, optimizer):
  synth = layouts.moco_release(tmp_path, version=version, optimizer=optimizer)
  assert _top_level(synth.path) == {'epoch', 'arch', 'state_dict'} | (
      set() if optimizer == 'absent' else {'optimizer'})
  model_id = 'mocov1-r50-200ep' if version == 1 else 'mocov2-r50-200ep'
  check(synth, convert(synth, tmp_path, model_id=model_id))


# ------------------------------------------------------------------ MoCo v3

@pytest.mark.parametrize('kind,optimizer', [('resnet', 'real'), ('vit', 'empty'),
                                            pytest.param('vit', 'absent', marks=SLOW)])
def test_mocov3_release(tmp_path, kind, optimizer):
  synth = layouts.mocov3_release(tmp_path, kind=kind, optimizer=optimizer)
  assert _top_level(synth.path) == {'epoch', 'arch', 'state_dict'} | (
      set() if optimizer == 'absent' else {'optimizer', 'scaler'})
  if kind == 'resnet':
    converted = convert(synth, tmp_path, model_id='mocov3-r50-300ep')
  else:  # the synthesised ViT has 2 blocks
    converted = convert(synth, tmp_path, model_id='mocov3-vits-300ep', arch_options={'depth': 2})
  check(synth, converted)


# ------------------------------------------------------------------ DINO

@pytest.mark.parametrize('kind,optimizer,fp16,dino_loss,submodel', [
    ('vit', 'real', True, True, 'teacher'), ('vit', 'empty', False, True, 'student'),
    pytest.param('vit', 'real', False, False, 'teacher', marks=SLOW),
    ('resnet', 'real', False, True, 'teacher')])
def test_dino_full_release(tmp_path, kind, optimizer, fp16, dino_loss, submodel):
  synth = layouts.dino_full_release(tmp_path, kind=kind, optimizer=optimizer, fp16=fp16,
                                    dino_loss=dino_loss, submodel=submodel)
  assert _top_level(synth.path) == ({'student', 'teacher', 'optimizer', 'epoch', 'args'}
                                    | ({'fp16_scaler'} if fp16 else set())
                                    | ({'dino_loss'} if dino_loss else set()))
  if kind == 'vit':
    converted = convert(synth, tmp_path, model_id='dino-vits16', arch_options={'depth': 2},
                        submodel=submodel)
  else:
    converted = convert(synth, tmp_path, method='dino', arch='resnet50', submodel=submodel)
  check(synth, converted)


# ------------------------------------------------------------------ SimSiam

@pytest.mark.parametrize('optimizer,fix_pred_lr', [('empty', True),
                                                   pytest.param('real', True, marks=SLOW)])
def test_simsiam_release(tmp_path, optimizer, fix_pred_lr):
  synth = layouts.simsiam_release(tmp_path, optimizer=optimizer, fix_pred_lr=fix_pred_lr)
  assert _top_level(synth.path) == {'epoch', 'arch', 'state_dict', 'optimizer'}
  check(synth, convert(synth, tmp_path, model_id='simsiam-r50-100ep'))


# ------------------------------------------------------------------ VICReg / Barlow Twins

@pytest.mark.parametrize('method,optimizer,filters', [
    ('vicreg', 'empty', 'function'), ('vicreg', 'real', 'function'),
    ('barlowtwins', 'real', 'function'), pytest.param('barlowtwins', 'real', 'flag', marks=SLOW)])
def test_vicreg_and_barlowtwins_full_release(tmp_path, method, optimizer, filters):
  synth = layouts.vicreg_or_barlow_release(tmp_path, method=method, optimizer=optimizer,
                                           filters=filters)
  assert _top_level(synth.path) == {'epoch', 'model', 'optimizer'}
  # The official LARS pickles the script's exclude_bias_and_norm function in
  # every param group: weights_only=True refuses such a file.
  rejected = layouts.rejected_by_weights_only(synth.path)
  assert rejected == (optimizer == 'real' and filters == 'function')
  with _warns_if(rejected):
    converted = convert(synth, tmp_path, method=method, arch='resnet18')
  check(synth, converted)


# ------------------------------------------------------------------ BYOL

@pytest.mark.parametrize('opt_state,submodel', [('optax_chain', 'online')])
def test_byol_release(tmp_path, opt_state, submodel):
  synth = layouts.byol_release(tmp_path, opt_state=opt_state, submodel=submodel)
  check(synth, convert(synth, tmp_path, model_id='byol-r50x1', submodel=submodel))


# ------------------------------------------------------------------ SimCLR (TF1)

@pytest.mark.parametrize('version,ema', [(1, False)])  # v2 with ema_model/: test_convert.py
def test_simclr_release(tmp_path, version, ema):
  synth = layouts.simclr_release(tmp_path, version=version, ema=ema)
  model_id = 'simclr-v1-r50x1' if version == 1 else 'simclr-v2-r50x1-sk0'
  converted = convert(synth, tmp_path, model_id=model_id)
  check(synth, converted)
  assert 'momentum optimizer slots' in converted.metadata['provenance']['dropped']


# ------------------------------------------------------------------ solo-learn (Lightning)

SOLO_CASES = [
    # (Lightning version, optimizer, precision, user ModelCheckpoint, omegaconf hparams)
    ('1.4.7', 'real', 16, False, False),   # no loops, native_amp_scaling_state
    pytest.param('1.6.4', 'real', 16, False, False, marks=SLOW),  # NativeMixedPrecisionPlugin
    ('1.6.4', 'empty', 32, False, False),  # optimizer_states [], lr_schedulers []
    pytest.param('2.1.2', 'real', 16, False, False, marks=SLOW),  # MixedPrecision
    ('2.1.2', 'real', 16, True, True),     # a user's run: ModelCheckpoint, DictConfig hparams
    ('1.4.7', 'real', 16, True, False),    # callbacks keyed by the callback's class
]


@pytest.mark.parametrize('version,optimizer,precision,user_callbacks,omegaconf_hparams', SOLO_CASES)
def test_solo_learn_lightning(tmp_path, version, optimizer, precision, user_callbacks,
                              omegaconf_hparams):
  synth = layouts.solo_lightning(tmp_path, version=version, optimizer=optimizer,
                                 precision=precision, user_callbacks=user_callbacks,
                                 omegaconf_hparams=omegaconf_hparams)
  keys = _top_level(synth.path)
  assert {'epoch', 'global_step', 'pytorch-lightning_version', 'state_dict', 'callbacks',
          'optimizer_states', 'lr_schedulers'} <= keys
  assert ('loops' in keys) == (version >= '1.6')
  rejected = layouts.rejected_by_weights_only(synth.path)
  assert rejected == (omegaconf_hparams or (user_callbacks and version < '1.5'))
  with _warns_if(rejected):
    converted = convert(synth, tmp_path, method='solo-learn', arch='resnet18')
  check(synth, converted)


@pytest.mark.parametrize('method', ['nnclr', 'all4one', 'deepclusterv2'])
def test_solo_learn_method_buffers(tmp_path, method):
  synth = layouts.solo_method_buffers(tmp_path, method=method)
  check(synth, convert(synth, tmp_path, method='solo-learn', arch='resnet18'))
