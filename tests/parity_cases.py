"""Every backbone configuration of the registry's supported rows, and the test that checks it.

A configuration is a row's ``arch`` with its ``arch_options`` (many rows share one: 21 are a
plain ResNet-50). tests/test_resnet_parity.py and tests/test_vit_parity.py compare the outputs
of each, built at its real depth and width, with torchvision / timm;
tests/test_readme.py names the test in the README's supported-models table. The lists are
read from the registry, so a new configuration gets a parity test (or a failing one) by
itself.
"""

from __future__ import annotations

from typing import Any, Mapping

from qscore_jax.models import list_models


def configuration_id(arch: str, options: Mapping[str, Any]) -> str:
  """``'resnet101-pool_padding=tf_same-width_multiplier=2'``: the pytest id of a configuration."""
  return '-'.join([arch] + [f'{k}={v}' for k, v in sorted(options.items())])


def registry_configurations(kind: str) -> dict[str, tuple[str, dict[str, Any]]]:
  """``{configuration id: (arch, options)}`` of the supported rows whose arch starts with
  ``kind`` ('resnet' or 'vit'), sorted by id. The selective-kernel (``sk_ratio``) rows are
  left to tests/test_simclr_sk.py, whose PyTorch reference follows google-research/simclr."""
  found = {}
  for spec in list_models():
    if spec.arch_options.get('sk_ratio'):
      continue  # SimCLR v2 selective-kernel nets: no torchvision twin; tests/test_simclr_sk.py
    if spec.supported and spec.arch.startswith(kind):
      found.setdefault(configuration_id(spec.arch, spec.arch_options),
                       (spec.arch, dict(spec.arch_options)))
  return dict(sorted(found.items()))


# Configurations that an earlier, more specific test already compares (with the same
# reference construction, at 224x224 and 225x193, batch 2).
COVERED_ELSEWHERE = {
    'resnet50': 'test_resnet_parity.py::test_torchvision_parity',
    'resnet50-conv_padding=tf_same-pool_padding=tf_same':
        'test_resnet_parity.py::test_tf_same_everywhere_parity',
    'resnet50-width_multiplier=2': 'test_resnet_parity.py::test_width_x2_all_channels_parity',
    'vit_small-num_heads=12-patch_size=16': 'test_vit_parity.py::test_timm_parity',
    'vit_small-num_heads=6-patch_size=16-pos_embed_interpolation=dino':
        'test_vit_parity.py::test_dino_interpolation_parity',
}

# Seconds each registry parity test takes on 2 lightly loaded cores (the cost follows parameter
# count and depth -- weight copies, XLA compilation -- more than image size): ResNet-50 x1/x2/x4
# 3-9, ResNet-101 6, x2 8, ResNet-152 11, x2 14, ResNet-50 x5 20 (6 GB peak), ResNet-200 x2 18;
# ViTs 4-8. The default run (.ci/run) had grown past 20 minutes with this converter
# tests, so the heaviest five are marked slow: ResNet-152 x2, the two ResNet-200 x2, ResNet-50 x5
# (27 s and 6 GB peak in the fresh-clone run) and ResNet-50 x4 with SimCLR's max-pool (19 s; x4
# and the TF-SAME max-pool each stay in the default run). The default run keeps every depth
# (ResNet-200 at small sizes, below) and padding mode, and widths x1/x2/x4.
SLOW = {
    'resnet50-width_multiplier=5',
    'resnet50-pool_padding=tf_same-width_multiplier=4',
    'resnet152-pool_padding=tf_same-width_multiplier=2',
    'resnet200-conv_padding=tf_same-pool_padding=tf_same-width_multiplier=2',
    'resnet200-width_multiplier=2',
}
# Of those, the one the default run checks at small sizes (64x64 and 97x65: even / odd at every
# stride-2 layer, as 224x224 / 225x193), at its real depth and width (14 s): BYOL's ResNet-200
# x2 with TF SAME everywhere, the default run's ResNet-200.
SMALL_IN_DEFAULT_RUN = {
    'resnet200-conv_padding=tf_same-pool_padding=tf_same-width_multiplier=2',
}


def parity_test(arch: str, options: Mapping[str, Any]) -> str:
  """The test (``file::name[id]``) that compares this configuration's outputs."""
  key = configuration_id(arch, options)
  if key in COVERED_ELSEWHERE:
    return COVERED_ELSEWHERE[key]
  module = 'test_vit_parity.py' if arch.startswith('vit') else 'test_resnet_parity.py'
  return f'{module}::test_registry_backbone_parity[{key}]'


def parity_status(arch: str, options: Mapping[str, Any]) -> str:
  """Which test compares the outputs, for the README: marked '(slow)' where the default run
  leaves it out, with the default run's small-size test where there is one."""
  key = configuration_id(arch, options)
  status = f'`{parity_test(arch, options)}`'
  if key in SLOW:
    status += ' (slow)'
  if key in SMALL_IN_DEFAULT_RUN:
    status += (f'; default run: `test_resnet_parity.py::test_registry_backbone_parity_small[{key}]`'
               ' at 64×64 and 97×65')
  return status
