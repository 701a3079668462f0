"""The XLA:CPU flag qscore_jax sets at import, and that it changes compilation."""

import os
import subprocess
import sys

import pytest

from qscore_jax import _xla_cpu

CHECK_CONV = """
import os, jax, jax.numpy as jnp
import qscore_jax
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
text = jax.jit(conv).lower(jnp.zeros((2, 56, 56, 64)), jnp.zeros((3, 3, 64, 64))).compile().as_text()
reduce = jax.jit(lambda x: x.sum((0, 1, 2))).lower(jnp.zeros((2, 56, 56, 64))).compile().as_text()
print(os.environ.get('XLA_FLAGS', ''), '|', '__ynn_fusion' in text, '|', '__ynn_fusion' in reduce)
"""


def _run(env_updates):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', _xla_cpu.OPT_OUT_ENV)}
  env.update(env_updates)
  out = subprocess.run([sys.executable, '-c', CHECK_CONV], env=env, capture_output=True,
                       text=True, check=True).stdout.strip()
  flags, conv_ynn, reduce_ynn = out.rsplit('|', 2)
  return flags.strip(), conv_ynn.strip() == 'True', reduce_ynn.strip() == 'True'


@pytest.mark.skipif(_xla_cpu._jaxlib_version() not in _xla_cpu.MEASURED_JAXLIB,  # pylint: disable=protected-access
                    reason='the flag is only applied on jaxlib versions where it was measured')
def test_import_routes_convolutions_away_from_ynnpack_and_reductions_to_it():
  flags, conv_ynn, reduce_ynn = _run({})
  assert _xla_cpu.cpu_flag() in flags and not conv_ynn and reduce_ynn
  # jaxlib's own default sends both to YNNPACK.
  flags, conv_ynn, reduce_ynn = _run({_xla_cpu.OPT_OUT_ENV: '1'})
  assert flags == '' and conv_ynn and reduce_ynn
  # The user's own setting wins.
  flags, conv_ynn, reduce_ynn = _run({'XLA_FLAGS': f'{_xla_cpu.YNN_FLAG}=individual_convolution'})
  assert flags == f'{_xla_cpu.YNN_FLAG}=individual_convolution' and conv_ynn and not reduce_ynn


def test_configure_rules(monkeypatch):
  monkeypatch.setattr(_xla_cpu, '_jaxlib_version', lambda: (0, 10))
  monkeypatch.setattr(_xla_cpu, '_backends_started', lambda: False)
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert _xla_cpu.configure(env) == _xla_cpu.cpu_flag()
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {_xla_cpu.cpu_flag()}'
  assert _xla_cpu.configure(env) is None  # already set: unchanged
  assert _xla_cpu.configure({_xla_cpu.OPT_OUT_ENV: '1'}) is None
  monkeypatch.setattr(_xla_cpu, '_jaxlib_version', lambda: (0, 99))
  env = {}
  assert _xla_cpu.configure(env) is None and 'XLA_FLAGS' not in env  # unknown jaxlib
  monkeypatch.setattr(_xla_cpu, '_jaxlib_version', lambda: (0, 10))
  monkeypatch.setattr(_xla_cpu, '_backends_started', lambda: True)
  with pytest.warns(UserWarning, match='already running'):
    assert _xla_cpu.configure({}) is None
