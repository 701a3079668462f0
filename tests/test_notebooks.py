"""The Colab notebooks (notebooks/*.ipynb): stored clean, and executed end to end on tiny settings.

Each notebook is run with papermill in a fresh kernel of this interpreter (the
``python3`` kernel of the environment: jupyter_client starts it with
``sys.executable``, which the notebooks print and the test checks), in a
temporary working directory, with its ``parameters`` cell overridden by the
tiny values below (``synthetic_shapes/tiny``: 256 train / 128 test images of
32 px, from the session's ``tiny_data_dir``; a handful of steps and probe
epochs). The model is the default of the notebooks, the shipped
``demo-simclr-r18w025``. 1.5 to 2.5 minutes for the three on a 2-core CPU.
"""

import json
import pathlib
import sys

import nbformat
import papermill
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NAMES = ('quickstart', 'finetune_tpu', 'interpretability')
KERNEL = 'python3'
DATASET = 'synthetic_shapes/tiny'

TINY = {
    'quickstart': dict(DATASET=DATASET, BATCH_SIZE=128, PROBE_EPOCHS=5,
                       COMPRESSION_REMOVED=[0.0, 0.4, 0.8], COMPRESSION_SEEDS=1,
                       COMPRESSION_PROBE_EPOCHS=3, PROGRESS=False),
    'finetune_tpu': dict(DATASET=DATASET, STEPS=4, BATCH_SIZE=32, REFERENCE_EXAMPLES=256,
                         LOG_EVERY=2, EMBED_BATCH_SIZE=128, PROBE_EPOCHS=5, PROGRESS=False),
    'interpretability': dict(DATASET=DATASET, BATCH_SIZE=64, PROBE_EPOCHS=5, SAMPLES_PER_GROUP=2,
                             PROGRESS=False),
}


def _execute(name: str, tmp_path: pathlib.Path,
             data_dir: str) -> tuple[pathlib.Path, nbformat.NotebookNode]:
  """Runs notebook ``name`` with the tiny parameters; returns its WORKDIR and executed copy."""
  workdir = tmp_path / 'work'
  output = tmp_path / f'{name}.out.ipynb'
  papermill.execute_notebook(
      str(NOTEBOOKS / f'{name}.ipynb'), str(output),
      parameters={**TINY[name], 'WORKDIR': str(workdir), 'DATA_DIR': data_dir},
      kernel_name=KERNEL, cwd=str(tmp_path), progress_bar=False, log_output=False)
  return workdir, nbformat.read(output, as_version=4)


def _text(notebook: nbformat.NotebookNode) -> str:
  """Everything the executed code cells printed."""
  parts = []
  for cell in notebook.cells:
    for out in cell.get('outputs', []):
      if out.get('output_type') == 'stream':
        parts.append(out['text'])
      elif 'text/plain' in out.get('data', {}):
        parts.append(out['data']['text/plain'])
  return '\n'.join(parts)


def _num_images(notebook: nbformat.NotebookNode) -> int:
  return sum('image/png' in out.get('data', {})
             for cell in notebook.cells for out in cell.get('outputs', []))


def _check_common(notebook: nbformat.NotebookNode) -> str:
  errors = [out for cell in notebook.cells for out in cell.get('outputs', [])
            if out.get('output_type') == 'error']
  assert not errors, errors
  text = _text(notebook)
  # The kernel is this interpreter (the environment with qscore_jax and ipykernel).
  assert f'python     {sys.executable}' in text, text[:500]
  return text


@pytest.mark.parametrize('name', NAMES)
def test_stored_notebook_is_clean(name):
  """Stored without outputs, with null execution counts and one papermill parameters cell."""
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(cell.outputs == [] for cell in code), f'{name}: clear the outputs'
  assert all(cell.execution_count is None for cell in code), f'{name}: clear execution counts'
  tagged = [cell for cell in notebook.cells if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1 and tagged[0].cell_type == 'code', f'{name}: one parameters cell'
  assert notebook.cells[0].cell_type == 'markdown'
  assert "INSTALL_FROM = ''" in tagged[0].source
  assert "MODEL = 'demo-simclr-r18w025'" in tagged[0].source
  assert 'WORKDIR = ' in tagged[0].source and 'DATA_DIR = None' in tagged[0].source
  # Every tiny override the CI run uses is a parameter of the notebook (a typo would be injected
  # as a new variable that nothing reads).
  for key in TINY[name]:
    assert f'\n{key} = ' in '\n' + tagged[0].source, f'{name}: no parameter {key}'


def test_quickstart(tmp_path, tiny_data_dir):
  workdir, notebook = _execute('quickstart', tmp_path, tiny_data_dir)
  text = _check_common(notebook)
  report = json.loads((workdir / 'report' / 'report.json').read_text())
  assert report['evaluation']['dataset'] == DATASET
  assert report['train']['split_size'] == 256 and report['evaluation']['split_size'] == 128
  assert [row['removed'] for row in report['compression']] == [0.0, 0.4, 0.8]
  q = report['misclassification']['qscore']
  assert f"AUPRC of Q-Score, correct = positive: {q['auprc_correct_positive']:.3f}" in text
  assert f"error = positive: {q['auprc_error_positive']:.3f}" in text
  for finding in report['findings']:
    assert f"{finding['verdict'].upper()}: {finding['claim']}" in text
  for figure in report['figures'].values():
    assert (workdir / 'report' / figure).is_file()
  # The analysis' five plots and the notebook's own scatter plot are shown inline.
  assert _num_images(notebook) >= 6


def test_finetune_tpu(tmp_path, tiny_data_dir):
  workdir, notebook = _execute('finetune_tpu', tmp_path, tiny_data_dir)
  text = _check_common(notebook)
  for run, kind in (('qscore', 'qscore'), ('plain', 'none')):
    run_config = json.loads((workdir / run / 'run.json').read_text())
    assert run_config['config']['regularizer']['kind'] == kind
    assert run_config['init'] == 'demo-simclr-r18w025'
    assert run_config['config']['data_dir'] == tiny_data_dir
    assert (workdir / run / 'model' / 'metadata.json').is_file()
    last = json.loads((workdir / run / 'metrics.jsonl').read_text().splitlines()[-1])
    assert last['step'] == 4
    assert (last['regularizer'] != 0) == (kind == 'qscore')
  reports = sorted((workdir / 'compare').glob('*/report.json'))
  assert [p.parent.name for p in reports] == ['0-demo-simclr-r18w025', '1-plain', '2-qscore']
  assert 'AUPRC of Q' in text and 'unknown config field' in text
  assert _num_images(notebook) >= 2


def test_interpretability(tmp_path, tiny_data_dir):
  workdir, notebook = _execute('interpretability', tmp_path, tiny_data_dir)
  text = _check_common(notebook)
  result = json.loads((workdir / 'interpret.json').read_text())
  assert result['dataset'] == DATASET and result['config']['stage'] == 'layer2'
  assert result['summary']['all']['images'] == 128
  for figure in result['figures'].values():
    assert (workdir / figure).is_file()
  assert f"feature_{result['feature']['index']}_top_images.png" in result['figures'].values()
  assert 'core mIoU' in text
  # The explicit jitted call: (8, 32, 32) heatmaps, one target each with the one-hot selection.
  assert 'heatmap (8, 32, 32) float32' in text
  assert 'num_targets (one-hot) [1 1 1 1 1 1 1 1]' in text
  assert _num_images(notebook) >= 5
