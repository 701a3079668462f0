"""Salient ImageNet: core and spurious masks for imagenet2012 training images.

Salient ImageNet (Singla & Feizi, ICLR 2022) annotates, for 232 ImageNet
classes, the 5 most predictive features of a robust ResNet-50 as *core* (part
of the object) or *spurious* (background, separate object), with a soft mask
per image and feature. Its published layout::

    salient_imagenet_dataset/
      wordnet_dict.py                  {class_index: 'n01440764', ...}
      <wnid>/image_names_map.csv       one column per feature index, listing image names
      <wnid>/feature_<k>/<name>.JPEG   the soft mask (grey, 0..255) of feature k on image <name>

and the Mechanical Turk answers ``mturk_results/discover_spurious_features.csv``
of the Salient ImageNet repository (not redistributable: pass its path). A
feature is spurious when at least 3 of its 5 answers are ``background`` or
``separate_object``, else core (the repository's rule).

``qscore prepare salient_imagenet --salient-dir DIR --annotations CSV`` builds
the tfds dataset ``salient_imagenet``: each annotated image, its imagenet2012
label and file name, and ``core_mask``/``spurious_mask`` (uint8 0..255, the
pixelwise maximum over the image's core, respectively spurious, features).
Images come from a prepared ``imagenet2012`` (one pass over its train split) or
from an ImageNet train folder (``--imagenet-train-dir``, ``<wnid>/<name>.JPEG``).
"""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import io
import pathlib

# Before tfds: TF imported quietly, off accelerators (see _tensorflow.py).
from qscore_jax.data import _tensorflow  # pylint: disable=unused-import

# pylint: disable=wrong-import-order
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from qscore_jax.data.errors import manual_download_error

SPURIOUS_ANSWERS = ('background', 'separate_object')


class SalientError(ValueError):
  """The Salient ImageNet folder or annotations do not have the published layout."""


@dataclasses.dataclass(frozen=True)
class SalientClass:
  """One annotated class: its features (index -> 'core'/'spurious') and images.

  Attributes:
    wnid: the class's WordNet id (its folder name).
    class_index: its imagenet2012 label index (from ``wordnet_dict.py``).
    features: ``{feature index: 'core' | 'spurious'}``.
    images: ``{image name: feature indices with a mask on that image}``.
  """
  wnid: str
  class_index: int
  features: dict[int, str]
  images: dict[str, tuple[int, ...]]  # image name -> feature indices with a mask


def read_annotations(csv_path: str | pathlib.Path) -> dict[tuple[int, int], str]:
  """``{(class_index, feature_index): 'core' | 'spurious'}`` from the MTurk answers CSV.

  Args:
    csv_path: ``mturk_results/discover_spurious_features.csv``.
  Raises:
    SalientError: missing file or columns.
  """
  path = pathlib.Path(csv_path).expanduser()
  if not path.is_file():
    raise SalientError(f'annotations file {path} does not exist: it is '
                       'mturk_results/discover_spurious_features.csv of '
                       'https://github.com/singlasahil14/salient_imagenet.')
  votes: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    needed = {'Input.class_index', 'Input.feature_index', 'Answer.main'}
    if not needed <= set(reader.fieldnames or ()):
      raise SalientError(f'{path} lacks the columns {sorted(needed - set(reader.fieldnames or ()))}'
                         ' of discover_spurious_features.csv.')
    for row in reader:
      votes[int(row['Input.class_index']), int(row['Input.feature_index'])].append(row['Answer.main'])
  return {key: 'spurious' if sum(a in SPURIOUS_ANSWERS for a in answers) >= 3 else 'core'
          for key, answers in votes.items()}


def read_wordnet_dict(root: pathlib.Path) -> dict[int, str]:
  """``wordnet_dict.py`` parsed as a literal (never executed).

  Args:
    root: the Salient ImageNet folder (a ``pathlib.Path``).
  Returns:
    ``{class_index: wnid}``.
  """
  path = root / 'wordnet_dict.py'
  if not path.is_file():
    raise SalientError(f'{root} is not a Salient ImageNet folder: wordnet_dict.py is missing.')
  try:
    mapping = ast.literal_eval(path.read_text())
  except (ValueError, SyntaxError) as error:
    raise SalientError(f'{path} is not a dict literal ({error}).') from None
  return {int(k): str(v) for k, v in mapping.items()}


def scan_salient_folder(root: str | pathlib.Path, annotations: dict[tuple[int, int], str],
                        imagenet_wnids: list[str]) -> list[SalientClass]:
  """The annotated classes of a Salient ImageNet folder, checked against imagenet2012.

  Args:
    root: the published ``salient_imagenet_dataset`` folder.
    annotations: :func:`read_annotations`; every feature with masks needs one.
    imagenet_wnids: the imagenet2012 class wnids, in label order.
  Returns:
    One :class:`SalientClass` per class folder, sorted by wnid.
  Raises:
    SalientError: the folder does not have the published layout.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise SalientError(f'Salient ImageNet folder {root} does not exist.')
  wordnet = read_wordnet_dict(root)
  index_of = {wnid: i for i, wnid in wordnet.items()}
  known = set(imagenet_wnids)
  folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  unknown = [p.name for p in folders if p.name not in index_of or p.name not in known]
  if unknown:
    raise SalientError(f'{root} has mask folders for classes that do not exist in '
                       f'wordnet_dict.py or imagenet2012: {unknown[:8]}. Remove them or fix the '
                       'folder names (they must be imagenet2012 WordNet ids).')
  classes = []
  for folder in folders:
    table = folder / 'image_names_map.csv'
    if not table.is_file():
      raise SalientError(f'{folder} lacks image_names_map.csv.')
    class_index = index_of[folder.name]
    images: dict[str, list[int]] = collections.defaultdict(list)
    features = {}
    with open(table, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      columns = [c for c in (reader.fieldnames or ()) if c.strip().isdigit()]
      for column in columns:
        feature = int(column)
        if (class_index, feature) not in annotations:
          raise SalientError(f'feature {feature} of class {class_index} ({folder.name}) has no '
                             'core/spurious annotation in the annotations file.')
        features[feature] = annotations[class_index, feature]
      for row in reader:
        for column in columns:
          name = (row[column] or '').strip()
          if name:
            images[name].append(int(column))
    classes.append(SalientClass(folder.name, class_index, features,
                                {k: tuple(v) for k, v in sorted(images.items())}))
  if not classes:
    raise SalientError(f'{root} has no class folders.')
  return classes


def class_masks(root: pathlib.Path, entry: SalientClass, image_name: str,
                shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(core, spurious) uint8 (H, W, 1) masks of one image: maxima over its features.

  Args:
    root: the Salient ImageNet folder (a ``pathlib.Path``).
    entry: the image's class (:class:`SalientClass`).
    image_name: the image's name, without ``.JPEG``.
    shape: ``(H, W)`` of the image; every mask must have it.
  """
  core = np.zeros(shape, np.uint8)
  spurious = np.zeros(shape, np.uint8)
  for feature in entry.images[image_name]:
    path = root / entry.wnid / f'feature_{feature}' / f'{image_name}.JPEG'
    if not path.is_file():
      raise SalientError(f'mask {path} is listed in image_names_map.csv but missing.')
    mask = np.asarray(Image.open(path).convert('L'))
    if mask.shape != shape:
      raise SalientError(f'mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is '
                         f'{shape[1]}x{shape[0]}: masks must have the size of the image.')
    target = core if entry.features[feature] == 'core' else spurious
    np.maximum(target, mask, out=target)
  return core[..., None], spurious[..., None]


class SalientImagenet(tfds.core.GeneratorBasedBuilder):
  """imagenet2012 training images of the 232 Salient ImageNet classes with core/spurious masks.

  Args:
    salient_dir: the published Salient ImageNet folder (needed to prepare).
    annotations: path of ``discover_spurious_features.csv`` (needed to prepare).
    imagenet_train_dir: read the images from this ImageNet train folder
      (``<wnid>/<name>.JPEG``) instead of a prepared imagenet2012.
    **kwargs: tfds builder arguments (``data_dir``, ``config``, ...).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, *, salient_dir=None, annotations=None, imagenet_train_dir=None, **kwargs):
    self._salient_dir = salient_dir
    self._annotations = annotations
    self._imagenet_train_dir = imagenet_train_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=_imagenet_wnids()),
            'file_name': tfds.features.Text(),
            'core_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'spurious_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
        }),
        homepage='https://github.com/singlasahil14/salient_imagenet')

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._salient_dir is None or self._annotations is None:
      raise SalientError('preparing salient_imagenet needs salient_dir (the published folder) '
                         'and annotations (discover_spurious_features.csv).')
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    root = pathlib.Path(self._salient_dir).expanduser()
    wnids = _imagenet_wnids()
    classes = scan_salient_folder(root, read_annotations(self._annotations), wnids)
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    by_name = {name: entry for entry in classes for name in entry.images}
    for file_name, jpeg in _imagenet_train_images(by_name, self._imagenet_train_dir,
                                                  self.data_dir_root):
      name = file_name.rsplit('.', 1)[0]
      entry = by_name[name]
      with Image.open(io.BytesIO(jpeg)) as image:
        shape = (image.height, image.width)
      core, spurious = class_masks(root, entry, name, shape)
      yield name, {'image': io.BytesIO(jpeg), 'label': label_of[entry.wnid],
                   'file_name': file_name, 'core_mask': core, 'spurious_mask': spurious}


def _imagenet_wnids() -> list[str]:
  return list(tfds.builder('imagenet2012').info.features['label'].names)


def _imagenet_train_images(wanted: dict[str, SalientClass], train_dir, data_dir):
  """(file name, JPEG bytes) of the wanted training images, from a folder or tfds."""
  missing = set(wanted)
  if train_dir is not None:
    train_dir = pathlib.Path(train_dir).expanduser()
    for name in sorted(wanted):
      path = train_dir / wanted[name].wnid / f'{name}.JPEG'
      if path.is_file():
        missing.discard(name)
        yield path.name, path.read_bytes()
  else:
    builder = tfds.builder('imagenet2012', data_dir=data_dir)
    if not builder.is_prepared():
      raise manual_download_error('imagenet2012', builder, needed_by='salient_imagenet')
    ds = builder.as_dataset(split='train', shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(ds):
      file_name = example['file_name'].decode()
      name = file_name.rsplit('.', 1)[0]
      if name in missing:
        missing.discard(name)
        yield file_name, example['image']
  if missing:
    raise SalientError(f'{len(missing)} annotated images are not in the ImageNet training data, '
                       f'e.g. {sorted(missing)[:3]}.')


def prepare(*, data_dir, salient_dir, annotations, imagenet_train_dir=None):
  """Builds the ``salient_imagenet`` tfds dataset in ``data_dir``.

  Args:
    data_dir: the tfds data directory.
    salient_dir: the published Salient ImageNet folder.
    annotations: path of ``discover_spurious_features.csv``.
    imagenet_train_dir: an ImageNet train folder to read the images from
      (default: the prepared imagenet2012 in ``data_dir``).
  Returns:
    The prepared tfds builder.
  """
  builder = tfds.builder('salient_imagenet', data_dir=data_dir, salient_dir=salient_dir,
                         annotations=annotations, imagenet_train_dir=imagenet_train_dir)
  builder.download_and_prepare()
  return builder
