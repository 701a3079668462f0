"""The data layer: built-in datasets, tfds, image folders, preprocessing, augmentations."""

import dataclasses
import hashlib
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from qscore_jax.data import (DatasetError, dataset_info, eval_batches, imagenet100_wnids,
                             read_split, ssl_batches)
from qscore_jax.data import augment, datasets, imagenet100, synthetic
from qscore_jax.models import get_model_spec


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _all(batches):
  out = {}
  for batch in batches:
    for key, value in batch.items():
      out.setdefault(key, []).append(value)
  return {k: np.concatenate(v) for k, v in out.items() if k != 'views'}


# ------------------------------------------------------------ synthetic shapes

def test_synthetic_shapes_same_seed_same_bytes(tmp_path):
  paths = []
  for run in ('a', 'b'):
    builder = tfds.builder('synthetic_shapes/tiny', data_dir=str(tmp_path / run))
    builder.download_and_prepare()
    files = sorted(pathlib.Path(builder.data_dir).glob('*.tfrecord*'))
    assert files
    paths.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
  assert paths[0] == paths[1]
  other = synthetic.ShapesConfig(name='other_seed', image_size=32, num_train=8, num_test=8, seed=1)
  params = other.params()
  assert not np.array_equal(synthetic.generate(params, 1, 'train', 0)['image'],
                            synthetic.generate(params, 0, 'train', 0)['image'])


def test_synthetic_examples_are_their_generator_in_split_order(data_dir):
  ds = read_split('synthetic_shapes/tiny', 'test', data_dir=data_dir, with_masks=True)
  params = synthetic.ShapesParams(image_size=32)
  for example in tfds.as_numpy(ds.take(12)):
    truth = synthetic.generate(params, 0, 'test', int(example['id']))
    np.testing.assert_array_equal(example['image'], truth['image'])
    np.testing.assert_array_equal(example['core_mask'], truth['core_mask'])
    assert example['label'] == truth['label']


def test_synthetic_ground_truth_is_sound():
  params = synthetic.ShapesParams()
  examples = [synthetic.generate(params, 0, 'train', i) for i in range(600)]
  labels = np.array([e['label'] for e in examples])
  assert set(labels) == set(range(10)) and np.bincount(labels).min() > 35
  misleading = np.mean([e['misleading'] for e in examples])
  assert 0.14 < misleading < 0.26  # 1 - spurious_rate = 0.2
  for e in examples[:100]:
    core, spurious = e['core_mask'][..., 0] > 0, e['spurious_mask'][..., 0] > 0
    assert core.any() and spurious.any() and not (core & spurious).any()
    assert e['image'].shape == (64, 64, 3) and e['image'].dtype == np.uint8
    assert (e['texture'] != e['label']) == e['misleading']


def test_fixed_colours_change_only_the_colours():
  random_, fixed = synthetic.ShapesParams(), synthetic.ShapesParams(colours='fixed')
  for i in range(20):
    a, b = synthetic.generate(random_, 0, 'train', i), synthetic.generate(fixed, 0, 'train', i)
    for key in ('label', 'texture', 'core_mask', 'spurious_mask'):
      np.testing.assert_array_equal(a[key], b[key])
    core = b['core_mask'][..., 0] > 0
    background = ~core & ~(b['spurious_mask'][..., 0] > 0)
    # Grey background, red object (up to brightness x0.8..1.2 and noise).
    grey = b['image'][background].astype(float).mean(axis=0)
    assert np.ptp(grey) < 8 and 95 < grey.mean() < 160
    red = b['image'][core].astype(float).mean(axis=0)
    assert red[0] > red[1] + 60 and red[0] > red[2] + 60
  with pytest.raises(ValueError, match="colours must be 'random' or 'fixed'"):
    synthetic.ShapesParams(colours='pastel')


# The images of the configurations before difficulty labels (sha256 of the first 20 examples
# of each split, taken before the change): the demo's and experiment's numbers depend on them.
GOLDEN = {'default': ('57cf06fbb309883b4f471a9e0ffe58605d09b38dc1406603a2b2c316367d522d',
                      synthetic.ShapesParams()),
          'fixed_colours_small': ('e2b8a2f461994532b4359c77b5be74e8c8a2fc57a2d6e74ee01451e128a5de97',
                                  synthetic.ShapesParams(image_size=32, colours='fixed'))}


@pytest.mark.parametrize('name', list(GOLDEN))
def test_difficulty_labels_left_the_earlier_images_unchanged(name):
  digest, params = GOLDEN[name]
  h = hashlib.sha256()
  for split in ('train', 'test'):
    for i in range(20):
      example = synthetic.generate(params, 0, split, i)
      for key in ('image', 'core_mask', 'spurious_mask'):
        h.update(example[key].tobytes())
      h.update(bytes([example['label'], example['texture'], example['misleading']]))
      assert example['occlusion'] == 0
  assert h.hexdigest() == digest
  config = {c.name: c for c in synthetic.SyntheticShapes.BUILDER_CONFIGS}['spurious']
  assert config.params() == synthetic.ShapesParams(image_size=32, colours='fixed')


def _eroded(mask):
  """Pixels whose 3x3 neighbourhood is all in ``mask`` (away from anti-aliased edges)."""
  padded = np.pad(mask, 1)
  return np.all([padded[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


@pytest.mark.parametrize('colours', ['fixed', 'random'])
def test_difficulty_labels_are_exact(colours):
  """object_area and occlusion from the masks: the same example rendered without clutter (every
  other draw identical) gives the whole object; contrast from noise-free pixels."""
  occluded = synthetic.ShapesParams(image_size=48, noise=0.0, colours=colours,
                                    scale_range=(0.12, 0.3), contrast_range=(0.3, 1.0),
                                    occlusion_range=(0.2, 0.5))
  whole = dataclasses.replace(occluded, occlusion_range=(0.0, 0.0))
  for i in range(40):
    a, b = synthetic.generate(occluded, 3, 'train', i), synthetic.generate(whole, 3, 'train', i)
    visible, full = a['core_mask'][..., 0] > 0, b['core_mask'][..., 0] > 0
    assert b['occlusion'] == 0 and a['object_area'] == b['object_area']
    assert a['object_area'] == np.float32(full.mean())
    assert not (visible & ~full).any()
    assert a['occlusion'] == np.float32((full & ~visible).sum() / full.sum())
    assert 0.2 - 2 / full.sum() <= a['occlusion'] <= 0.5 + 2 / full.sum()  # the drawn share
    assert not (a['spurious_mask'][..., 0] > 0)[full & ~visible].any()
    # Contrast: noise-free pixels well inside the object against the plain background.
    inside = _eroded(full & visible)
    plain = _eroded(~full & ~(a['spurious_mask'][..., 0] > 0) & ~_occluded_or_patch(a, b))
    if inside.sum() >= 4 and plain.sum() >= 4:
      image = a['image'].astype(np.float64) / 255
      measured = np.abs(image[inside].mean(0) - image[plain].mean(0)).mean()
      assert abs(measured - a['contrast']) < 2 / 255, (i, measured, a['contrast'])


def _occluded_or_patch(a, b):
  """Pixels that differ between the cluttered and the clean rendering (the clutter), or
  belong to the textured patch (under or beside the object)."""
  return np.any(a['image'] != b['image'], axis=-1) | (b['spurious_mask'][..., 0] > 0)


def test_the_study_configurations_separate_the_sources_of_error():
  configs = {c.name: c.params() for c in synthetic.SyntheticShapes.BUILDER_CONFIGS}
  stats = {}
  for name in ('weak_evidence', 'spurious', 'mixed'):
    examples = [synthetic.generate(configs[name], 0, 'train', i) for i in range(500)]
    stats[name] = {key: np.array([e[key] for e in examples])
                   for key in ('label', 'texture', 'misleading', 'object_area', 'occlusion',
                               'contrast')}
  weak, spurious, mixed = stats['weak_evidence'], stats['spurious'], stats['mixed']
  # weak_evidence: the texture says nothing about the class; difficulty varies widely.
  assert abs(weak['misleading'].mean() - 0.9) < 0.04
  assert np.ptp(weak['object_area']) > 0.2 and np.ptp(weak['occlusion']) > 0.4
  # Fixed colours: the object differs from the background by 0.3 at full contrast.
  assert weak['contrast'].min() < 0.1 < 0.25 < weak['contrast'].max()
  # spurious: easy, unoccluded objects at full contrast; the class's texture 80% of the time.
  assert abs(spurious['misleading'].mean() - 0.2) < 0.05 and (spurious['occlusion'] == 0).all()
  assert spurious['contrast'].min() > 0.2
  # mixed: both.
  assert abs(mixed['misleading'].mean() - 0.2) < 0.05 and np.ptp(mixed['occlusion']) > 0.4
  with pytest.raises(ValueError, match=r'occlusion_range must be \(lo, hi\) with 0 <= lo <= hi'):
    synthetic.ShapesParams(occlusion_range=(0.5, 0.2))


def test_difficulty_labels_reach_the_tfds_dataset(tmp_path):
  config = synthetic.ShapesConfig(name='tiny_difficult', image_size=32, num_train=6, num_test=4,
                                  colours='fixed', occlusion_range=(0.1, 0.4),
                                  contrast_range=(0.2, 1.0))
  builder = synthetic.SyntheticShapes(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  examples = list(tfds.as_numpy(builder.as_dataset(split='test')))  # in generation order
  assert len(examples) == 4
  for index, example in enumerate(examples):
    truth = synthetic.generate(config.params(), 0, 'test', index)
    for key in ('object_area', 'occlusion', 'contrast'):
      assert example[key] == truth[key]
    np.testing.assert_array_equal(example['image'], truth['image'])
  assert str(builder.info.version) == '1.2.0'


def test_split_attributes_give_the_ground_truth_by_id(data_dir):
  attributes = datasets.split_attributes('synthetic_shapes/tiny', 'test', data_dir=data_dir)
  assert set(attributes) == set(datasets.DIFFICULTY_FEATURES)
  assert all(len(v) == 128 for v in attributes.values())
  params = synthetic.ShapesParams(image_size=32)
  for i in (0, 5, 127):
    truth = synthetic.generate(params, 0, 'test', i)
    for key, values in attributes.items():
      assert values[i] == truth[key], (key, i)
  with pytest.raises(DatasetError, match=r'no feature colour; its scalar features are .*contrast'):
    datasets.split_attributes('synthetic_shapes/tiny', 'test', ['colour'], data_dir=data_dir)


# ------------------------------------------------------------------- digits

def test_sklearn_digits_are_the_real_scans(data_dir):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  info = dataset_info('sklearn_digits/32px', data_dir)
  assert info.splits['train'] + info.splits['test'] == 1797 and info.num_classes == 10
  example = next(iter(tfds.as_numpy(read_split('sklearn_digits/32px', 'train', data_dir=data_dir))))
  first = load_digits().images[0]
  assert example['image'].shape == (32, 32, 3)
  # The upsampled scan still shows the 8x8 original: block means follow it.
  blocks = example['image'][..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
  assert np.corrcoef(blocks.ravel(), -first.ravel())[0, 1] > 0.9


# ------------------------------------------------------------- eval batches

def test_eval_batches_pad_and_mask_the_last_batch(data_dir):
  batches = eval_batches('synthetic_shapes/tiny', 'test', batch_size=48, data_dir=data_dir,
                         with_masks=True, process_count=1, local_device_count=1)
  assert batches.num_batches == 3 and len(batches) == 3
  got = _all(batches)
  assert got['image'].shape == (144, 32, 32, 3) and got['core_mask'].shape == (144, 32, 32)
  assert got['mask'].sum() == 128
  np.testing.assert_array_equal(np.sort(got['id'][got['mask']]), np.arange(128))
  assert (got['id'][~got['mask']] == -1).all() and (got['label'][~got['mask']] == -1).all()
  assert got['image'][~got['mask']].max() == 0
  assert 0 <= got['image'][got['mask']].min() and got['image'].max() <= 1


def test_batch_size_must_split_over_devices(data_dir):
  with pytest.raises(ValueError, match='does not split over the 8 devices.*multiple of 8'):
    eval_batches('synthetic_shapes/tiny', 'test', batch_size=12, data_dir=data_dir,
                 process_count=2, local_device_count=4)


def test_eval_preprocessing_matches_torchvision():
  """Resize 256 + center crop 224 (+ normalise) against torchvision on PIL."""
  import torchvision.transforms as T  # pylint: disable=import-outside-toplevel
  from qscore_jax.data.preprocess import eval_transform  # pylint: disable=import-outside-toplevel
  from qscore_jax.summary import generated_images  # pylint: disable=import-outside-toplevel
  image = (generated_images(1, 375, 500, seed=3)[0] * 255).astype(np.uint8)
  for model_id in ('swav-r50-800ep', 'dino-vits16'):
    pre = get_model_spec(model_id).preprocessing
    mode = {'bilinear': T.InterpolationMode.BILINEAR, 'bicubic': T.InterpolationMode.BICUBIC}
    reference = T.Compose([T.Resize(256, interpolation=mode[pre.interpolation]), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(pre.mean, pre.std)])(Image.fromarray(image))
    ours = eval_transform(pre)(tf.constant(image)).numpy()
    # PIL rounds the resized image to 8 bits; TF keeps floats: within one grey level.
    diff = np.abs(ours - reference.permute(1, 2, 0).numpy()) * np.array(pre.std)
    assert diff.max() < 1.5 / 255 and diff.mean() < 0.3 / 255


def test_crop_then_resize_and_unit_range_input():
  from qscore_jax.data.preprocess import eval_transform  # pylint: disable=import-outside-toplevel
  pre = get_model_spec('simclr-v1-r50x1').preprocessing
  image = np.zeros((300, 400, 3), np.uint8)
  image[:, 200:] = 255  # right half white
  out = eval_transform(pre)(tf.constant(image)).numpy()
  assert out.shape == (224, 224, 3) and out.min() >= 0 and out.max() <= 1  # [0, 1], no mean/std
  assert abs(out[:, :112].mean()) < 0.02 and out[:, 113:].mean() > 0.98


# ------------------------------------------------------------------ imagenet

def test_imagenet2012_through_mock_data(monkeypatch):
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  pre = get_model_spec('mocov2-r50-800ep').preprocessing
  with tfds.testing.mock_data(num_examples=10):
    batches = eval_batches('imagenet2012', 'validation', batch_size=4, preprocessing=pre,
                           process_count=1, local_device_count=1)
    got = _all(batches)
  assert batches.num_batches == 3 and got['image'].shape == (12, 224, 224, 3)
  np.testing.assert_array_equal(got['id'][got['mask']], np.arange(10))
  assert got['label'][got['mask']].max() < 1000


def test_imagenet100_filter_under_mock_data():
  names = tfds.builder('imagenet2012').info.features['label'].names
  wnids = imagenet100_wnids()
  assert len(wnids) == 100 and list(wnids) == sorted(wnids)
  assert 'n02869837' in wnids  # first id of CMC's list
  with tfds.testing.mock_data(num_examples=400):
    source = tfds.load('imagenet2012', split='train')
    kept = list(tfds.as_numpy(imagenet100.filter_imagenet100(source, names)))
    originals = [int(e['label']) for e in tfds.as_numpy(source)]
  expected = [wnids.index(names[l]) for l in originals if names[l] in wnids]
  assert [int(e['label']) for e in kept] == expected and 0 < len(kept) < 400
  assert all(0 <= e['label'] < 100 for e in kept)


def test_imagenet100_builder_copies_the_100_classes(tmp_path, monkeypatch):
  names = tfds.builder('imagenet2012').info.features['label'].names
  wnids = imagenet100_wnids()
  labels = [names.index(wnids[0]), names.index('n01440764'), names.index(wnids[-1]), 5]
  jpegs = []
  for i, _ in enumerate(labels):
    buffer = tf.io.encode_jpeg(tf.fill([20 + i, 30, 3], tf.constant(40 * i, tf.uint8)))
    jpegs.append(buffer.numpy())
  source = tf.data.Dataset.from_tensor_slices({
      'image': jpegs, 'label': tf.constant(labels, tf.int64),
      'file_name': [f'img_{i}.JPEG' for i in range(len(labels))]})
  monkeypatch.setattr(imagenet100, '_imagenet2012_source', lambda split, data_dir: (source, names))
  builder = tfds.builder('imagenet100', data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits['train'].num_examples == 2
  examples = sorted(tfds.as_numpy(builder.as_dataset(split='train')),
                    key=lambda e: e['file_name'])
  assert [int(e['label']) for e in examples] == [0, 99]
  assert examples[0]['image'].shape == (20, 30, 3)  # the JPEG passed through


def test_missing_manual_download_says_where_and_how(tmp_path):
  with pytest.raises(DatasetError) as error:
    eval_batches('imagenet2012', 'validation', batch_size=8, data_dir=str(tmp_path),
                 process_count=1, local_device_count=1)
  text = str(error.value)
  assert str(tmp_path / 'downloads' / 'manual') in text
  assert 'ILSVRC2012_img_train.tar' in text and 'qscore prepare imagenet2012' in text
  with pytest.raises(DatasetError, match='imagenet100 is built from imagenet2012'):
    dataset_info('imagenet100', str(tmp_path))


def test_unknown_dataset_name_suggests():
  with pytest.raises(DatasetError, match=r"Unknown dataset 'cifar1'.*'cifar10'.*folder:"):
    dataset_info('cifar1')
  with pytest.raises(DatasetError, match="no split 'valid'"):
    eval_batches('synthetic_shapes/tiny', 'valid', batch_size=8, process_count=1,
                 local_device_count=1)


# -------------------------------------------------------------- image folder

def _write_folder(root: pathlib.Path, layout):
  rng = np.random.default_rng(0)
  for relative, size in layout:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
  layout = [('dog/b.png', (20, 30)), ('cat/z.jpg', (40, 40)), ('cat/a.png', (25, 25)),
            ('dog/a.bmp', (30, 20)), ('cat/sub/c.png', (10, 10))]
  _write_folder(tmp_path / 'images', layout)
  (tmp_path / 'images' / 'cat' / 'notes.txt').write_text('not an image')
  name = f'folder:{tmp_path / "images"}'
  info = dataset_info(name)
  assert info.class_names == ('cat', 'dog') and info.splits == {'train': 5}
  examples = list(tfds.as_numpy(read_split(name, 'train')))
  assert [int(e['id']) for e in examples] == [0, 1, 2, 3, 4]
  assert [int(e['label']) for e in examples] == [0, 0, 0, 1, 1]  # sorted classes, sorted paths
  assert [e['image'].shape for e in examples][:2] == [(25, 25, 3), (10, 10, 3)]
  pre = get_model_spec('dino-vits16').preprocessing
  got = _all(eval_batches(name, 'train', batch_size=4, preprocessing=pre, image_size=32,
                          process_count=1, local_device_count=1))
  assert got['image'].shape == (8, 32, 32, 3) and got['mask'].sum() == 5


def test_image_folder_with_splits(tmp_path):
  _write_folder(tmp_path, [('train/a/1.png', (8, 8)), ('train/b/1.png', (8, 8)),
                           ('test/b/2.png', (8, 8))])
  info = dataset_info(f'folder:{tmp_path}')
  assert info.splits == {'test': 1, 'train': 2} and info.class_names == ('a', 'b')


def test_bad_image_folders(tmp_path):
  with pytest.raises(DatasetError, match='does not exist'):
    dataset_info(f'folder:{tmp_path / "missing"}')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match='no sub-folders'):
    dataset_info(f'folder:{tmp_path / "empty"}')
  (tmp_path / 'noimages' / 'cat').mkdir(parents=True)
  (tmp_path / 'noimages' / 'cat' / 'readme.txt').write_text('x')
  with pytest.raises(DatasetError, match='holds no images'):
    dataset_info(f'folder:{tmp_path / "noimages"}')
  _write_folder(tmp_path / 'corrupt', [('cat/good.png', (16, 16)), ('dog/bad.jpg', (64, 64))])
  bad = tmp_path / 'corrupt' / 'dog' / 'bad.jpg'
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(DatasetError, match=r'1 image\(s\) cannot be decoded: .*dog/bad\.jpg'):
    dataset_info(f'folder:{tmp_path / "corrupt"}')


# ------------------------------------------------------------- augmentations

@pytest.mark.parametrize('method,views', [('simclr', 2), ('byol', 2), ('moco', 2),
                                          ('swav', 8), ('dino', 10)])
def test_recipes(method, views):
  r = augment.recipe(method, image_size=64, local_size=32)
  assert len(r.views) == views
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8))
  seed = augment.example_seed(3, 0, 17)
  out = augment.augment_views(image, r, seed)
  again = augment.augment_views(image, r, seed)
  for view, twin, spec in zip(out, again, r.views):
    assert view.shape == (spec.size, spec.size, 3)
    assert 0 <= float(tf.reduce_min(view)) and float(tf.reduce_max(view)) <= 1
    np.testing.assert_array_equal(view.numpy(), twin.numpy())
  other = augment.augment_views(image, r, augment.example_seed(3, 0, 18))
  assert not np.array_equal(out[0].numpy(), other[0].numpy())
  if method == 'byol':  # asymmetric: blur always on view 1, solarize only on view 2
    assert (r.views[0].blur, r.views[1].blur, r.views[1].solarize) == (1.0, 0.1, 0.2)


def test_ssl_views_do_not_depend_on_batching_or_processes(data_dir):
  def views_by_id(**kwargs):
    out = {}
    for batch in ssl_batches('synthetic_shapes/tiny', recipe='simclr', seed=5, epochs=1,
                             data_dir=data_dir, local_device_count=1, **kwargs):
      for i, example_id in enumerate(batch['id']):
        out[int(example_id)] = batch['views'][0][i]
    return out

  one = views_by_id(batch_size=16, process_count=1)
  shard = views_by_id(batch_size=8, process_count=2, process_index=1)
  common = set(one) & set(shard)
  assert len(common) > 20
  for example_id in common:
    np.testing.assert_array_equal(one[example_id], shard[example_id])


def test_ssl_resume_is_exact(data_dir):
  def run(start_step, count):
    batches = ssl_batches('synthetic_shapes/tiny', recipe='byol', batch_size=32, seed=1,
                          data_dir=data_dir, start_step=start_step, process_count=1,
                          local_device_count=1)
    out = []
    for i, batch in enumerate(batches):
      if i == count:
        break
      out.append(batch)
    return out

  full = run(0, 11)  # 8 batches per epoch: crosses into epoch 1
  resumed = run(9, 2)
  for a, b in zip(full[9:], resumed):
    np.testing.assert_array_equal(a['id'], b['id'])
    np.testing.assert_array_equal(a['epoch'], b['epoch'])
    for va, vb in zip(a['views'], b['views']):
      np.testing.assert_array_equal(va, vb)
  assert full[8]['epoch'][0] == 1 and set(full[0]['id']) != set(full[8]['id'])


def test_ssl_normalisation_uses_the_model_statistics(data_dir):
  pre = get_model_spec('swav-r50-800ep').preprocessing
  batch = next(iter(ssl_batches('synthetic_shapes/tiny', recipe='swav', batch_size=8, seed=0,
                                preprocessing=pre, image_size=32, data_dir=data_dir,
                                process_count=1, local_device_count=1)))
  assert len(batch['views']) == 8 and batch['views'][2].shape == (8, 14, 14, 3)
  assert batch['views'][0].min() < -0.5  # (0 - mean) / std
