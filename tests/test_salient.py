"""Salient ImageNet reader on a folder in the published layout, generated here."""

import csv
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from qscore_jax.data import eval_batches, read_split
from qscore_jax.data import salient
from qscore_jax.models import get_preprocessing

CLASSES = {0: 'n01440764', 1: 'n01443537'}
FEATURES = {0: {59: 'core', 12: 'spurious'}, 1: {7: 'spurious', 8: 'core'}}


def _make(tmp_path: pathlib.Path, *, extra_class=None, bad_mask_size=False):
  rng = np.random.default_rng(0)
  root, train = tmp_path / 'salient_imagenet_dataset', tmp_path / 'imagenet' / 'train'
  root.mkdir(parents=True)
  (root / 'wordnet_dict.py').write_text(repr(CLASSES))
  rows, truth = [], {}
  for class_index, wnid in CLASSES.items():
    names = [f'{wnid}_{i}' for i in range(3)]
    (train / wnid).mkdir(parents=True)
    sizes = {}
    for i, name in enumerate(names):
      sizes[name] = (30 + 2 * i, 40)
      Image.fromarray(rng.integers(0, 255, (*sizes[name], 3), dtype=np.uint8)).save(
          train / wnid / f'{name}.JPEG')
    columns = {}
    for feature, kind in FEATURES[class_index].items():
      listed = names[:2] if kind == 'core' else names[1:]
      columns[str(feature)] = listed
      folder = root / wnid / f'feature_{feature}'
      folder.mkdir(parents=True)
      for name in listed:
        h, w = sizes[name]
        if bad_mask_size:
          h += 1
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(folder / f'{name}.JPEG')
        mask = np.asarray(Image.open(folder / f'{name}.JPEG'))
        key = (name, kind)
        truth[key] = np.maximum(truth.get(key, np.zeros_like(mask)), mask)
      votes = ['background'] * 3 + ['main_object'] * 2 if kind == 'spurious' else \
          ['main_object'] * 3 + ['separate_object'] * 2
      rows += [(wnid, class_index, feature, v) for v in votes]
    with open(root / wnid / 'image_names_map.csv', 'w', newline='') as f:
      writer = csv.writer(f)
      keys = list(columns)
      writer.writerow(keys)
      for r in range(2):
        writer.writerow([columns[k][r] for k in keys])
  if extra_class:
    (root / extra_class).mkdir()
  annotations = tmp_path / 'discover_spurious_features.csv'
  with open(annotations, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['WorkerId', 'Input.wordnet_id', 'Input.class_index', 'Input.feature_index',
                     'Input.feature_rank', 'Answer.main', 'Answer.confidence', 'Answer.reasons'])
    for i, (wnid, class_index, feature, vote) in enumerate(rows):
      writer.writerow([i, wnid, class_index, feature, 1, vote, 4.0, 'x'])
  return root, annotations, train, truth


def test_annotations_follow_the_published_rule(tmp_path):
  _, annotations, _, _ = _make(tmp_path)
  labels = salient.read_annotations(annotations)
  assert labels == {(c, f): k for c, features in FEATURES.items() for f, k in features.items()}


def test_prepare_attaches_core_and_spurious_masks(tmp_path):
  root, annotations, train, truth = _make(tmp_path)
  data_dir = str(tmp_path / 'tfds')
  salient.prepare(data_dir=data_dir, salient_dir=root, annotations=annotations,
                  imagenet_train_dir=train)
  examples = list(tfds.as_numpy(read_split('salient_imagenet', 'train', data_dir=data_dir,
                                           with_masks=True)))
  assert len(examples) == 6
  names = tfds.builder('imagenet2012').info.features['label'].names
  for example in examples:
    assert names[int(example['label'])] in CLASSES.values()
    assert example['core_mask'].shape[:2] == example['image'].shape[:2]
  # Every stored mask equals the maximum of the feature masks of its kind.
  expected = sorted(int(m.sum()) for (n, k), m in truth.items() if k == 'core')
  stored = sorted(int(e['core_mask'].sum()) for e in examples if e['core_mask'].any())
  assert stored == expected
  batches = eval_batches('salient_imagenet', 'train', batch_size=4, data_dir=data_dir,
                         with_masks=True, preprocessing=get_preprocessing('imagenet'),
                         image_size=32, process_count=1, local_device_count=1)
  batch = next(iter(batches))
  assert batch['core_mask'].shape == (4, 32, 32) and batch['core_mask'].max() <= 1


def test_mask_folder_for_a_class_that_does_not_exist(tmp_path):
  root, annotations, train, _ = _make(tmp_path, extra_class='n99999999')
  with pytest.raises(salient.SalientError, match=r'classes that do not exist.*n99999999'):
    salient.prepare(data_dir=str(tmp_path / 'tfds'), salient_dir=root, annotations=annotations,
                    imagenet_train_dir=train)


def test_mask_of_another_size_than_its_image(tmp_path):
  root, annotations, train, _ = _make(tmp_path, bad_mask_size=True)
  with pytest.raises(salient.SalientError, match='masks must have the size of the image'):
    salient.prepare(data_dir=str(tmp_path / 'tfds'), salient_dir=root, annotations=annotations,
                    imagenet_train_dir=train)


def test_missing_annotations_and_folder(tmp_path):
  with pytest.raises(salient.SalientError, match='discover_spurious_features.csv'):
    salient.read_annotations(tmp_path / 'nope.csv')
  with pytest.raises(salient.SalientError, match='wordnet_dict.py is missing'):
    salient.read_wordnet_dict(tmp_path)
