"""The data layer's errors, in a module of their own (standard library only).

:mod:`~qscore_jax.data.datasets` (which re-exports both names) and the dataset
builders it registers (:mod:`~qscore_jax.data.imagenet100`,
:mod:`~qscore_jax.data.salient`) all raise them, so they import this module
rather than each other; catching :class:`DatasetError` imports no TensorFlow.
"""

from __future__ import annotations

from etils import epath


class DatasetError(ValueError):
  """A dataset name, split or preparation problem, with what to do about it."""


def manual_download_error(name: str, dataset_builder, *, needed_by: str | None = None) -> DatasetError:
  """The error for a manual-download dataset that is not prepared yet.

  Args:
    name: the dataset needing a manual download (e.g. ``'imagenet2012'``).
    dataset_builder: its tfds builder (gives the data directory).
    needed_by: the dataset built from it (e.g. ``'imagenet100'``), if any.
  Returns:
    A :class:`DatasetError` saying which files to put where and what to run.
  """
  manual = epath.Path(dataset_builder.data_dir_root) / 'downloads' / 'manual'  # gs:// too
  data_dir = dataset_builder.data_dir_root
  files = {'imagenet2012': 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
                           '(from https://image-net.org/download-images.php)'}.get(
                               name, 'the files its tfds documentation lists')
  present = sorted(p.name for p in manual.glob('*')) if manual.is_dir() else []
  state = (f'{manual} holds {present[:4]}' if present else f'{manual} is missing or empty')
  prefix = f'{needed_by} is built from {name}, which' if needed_by else f'{name}'
  return DatasetError(
      f'{prefix} is not prepared in {data_dir}, and {state}. Put {files} in {manual}, then run '
      f'`qscore prepare {name} --data-dir {data_dir}` (hours for imagenet2012; needs ~300 GB).'
      + (f' Then run `qscore prepare {needed_by} --data-dir {data_dir}`.' if needed_by else ''))


__all__ = ['DatasetError', 'manual_download_error']
