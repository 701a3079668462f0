"""Synthetic shapes: a built-in dataset with ground-truth core and spurious masks.

The project's offline stand-in for ImageNet + Salient ImageNet. Each image
holds one object whose *shape* is the class (10 shapes), at a random position,
scale, rotation and colour, over a plain noisy background that carries a
textured patch (10 textures). The texture is a *spurious* attribute: with
probability ``spurious_rate`` it is the texture paired with the class, else
one of the other nine, so that a share of the samples carries a misleading
cue. Every example stores its ground truth:

* ``core_mask``: the object's pixels, uint8 (H, W, 1), 255 inside, 0 outside;
* ``spurious_mask``: the visible textured patch, likewise;
* ``texture``: the texture drawn, and ``misleading``: whether it is *not*
  the class's own texture;
* the example's *difficulty*: ``object_area`` (the share of the image the
  whole object covers), ``occlusion`` (the share of the object's pixels hidden
  by clutter; ``core_mask`` is the visible rest) and ``contrast`` (the mean
  absolute RGB difference between object and background colours, in [0, 1], as
  the image shows them before noise: after its brightness factor and clipping),
  all exact.

Configs: ``default`` (64 px, 4,000 / 1,000), ``small`` (32 px), ``tiny`` (for
tests), and ``fixed_colours`` / ``fixed_colours_small``: the same images with
one colour scheme for all (see :class:`ShapesParams`), the data for
self-supervised pre-training from scratch. Three configurations separate the
sources of a probe's errors (32 px, fixed colours): ``weak_evidence`` (small,
faint or occluded objects; a texture unrelated to the class), ``spurious`` (the
images of ``fixed_colours_small``: easy objects, a texture that is the class's
80% of the time) and ``mixed`` (both).

Generation is deterministic: example ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])``, independent of any other example,
so the same configuration always gives the same bytes. It is registered as the
tfds builder ``synthetic_shapes`` and prepares in seconds.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

# Before tfds: TF imported quietly, off accelerators (see _tensorflow.py).
from qscore_jax.data import _tensorflow  # pylint: disable=unused-import

# pylint: disable=wrong-import-order
import numpy as np
import tensorflow_datasets as tfds
from matplotlib.path import Path

SHAPES = ('circle', 'ring', 'triangle', 'square', 'pentagon', 'hexagon', 'star', 'cross',
          'crescent', 'arrow')
TEXTURES = ('horizontal_stripes', 'vertical_stripes', 'diagonal_stripes', 'checkerboard',
            'dots', 'grid', 'rings', 'waves', 'zigzag', 'blotches')
SPLITS = ('train', 'test')


def _regular_polygon(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
  angles = phase + 2 * math.pi * np.arange(n) / n
  return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  angles = math.pi / 2 + math.pi * np.arange(2 * points) / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_ARROW = np.array([[-1.0, -0.3], [0.15, -0.3], [0.15, -0.7], [1.0, 0.0], [0.15, 0.7],
                   [0.15, 0.3], [-1.0, 0.3]])
_POLYGONS = {'triangle': Path(_regular_polygon(3)), 'square': Path(_regular_polygon(4, phase=math.pi / 4)),
             'pentagon': Path(_regular_polygon(5)), 'hexagon': Path(_regular_polygon(6)),
             'star': Path(_star()), 'arrow': Path(_ARROW)}


def shape_coverage(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether object-frame points (u, v) (object radius 1) lie inside ``shape``; bool.

  Args:
    shape: one of :data:`SHAPES`.
    u: horizontal object-frame coordinates, any shape.
    v: vertical object-frame coordinates, the same shape as ``u``.
  Returns:
    bool array of the shape of ``u``.
  """
  r = np.hypot(u, v)
  if shape == 'circle':
    return r <= 1.0
  if shape == 'ring':
    return (r <= 1.0) & (r >= 0.55)
  if shape == 'cross':
    return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
  if shape == 'crescent':
    return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
  points = np.stack([u.ravel(), v.ravel()], axis=1)
  return _POLYGONS[shape].contains_points(points).reshape(u.shape)


def texture_pattern(texture: str, x: np.ndarray, y: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
  """A texture's intensity in [0, 1] at pixel coordinates (x, y) in [0, 1).

  Args:
    texture: one of :data:`TEXTURES`.
    x: horizontal coordinates in [0, 1), e.g. (S, S).
    y: vertical coordinates, the same shape as ``x``.
    rng: draws the texture's frequency, phase (and centres).
  Returns:
    Array of the shape of ``x`` (float32 for the binary textures).
  """
  freq = rng.uniform(6.0, 10.0)
  phase = rng.uniform(0, 2 * math.pi)
  if texture == 'horizontal_stripes':
    return (np.sin(2 * math.pi * freq * y + phase) > 0).astype(np.float32)
  if texture == 'vertical_stripes':
    return (np.sin(2 * math.pi * freq * x + phase) > 0).astype(np.float32)
  if texture == 'diagonal_stripes':
    return (np.sin(2 * math.pi * freq * (x + y) / math.sqrt(2) + phase) > 0).astype(np.float32)
  if texture == 'checkerboard':
    return ((np.floor(freq * x + phase) + np.floor(freq * y)) % 2).astype(np.float32)
  if texture == 'dots':
    return ((np.sin(2 * math.pi * freq * x + phase) * np.sin(2 * math.pi * freq * y)) > 0.5
            ).astype(np.float32)
  if texture == 'grid':
    return ((np.abs(np.sin(math.pi * freq * x + phase)) < 0.3)
            | (np.abs(np.sin(math.pi * freq * y)) < 0.3)).astype(np.float32)
  if texture == 'rings':
    cx, cy = rng.uniform(0, 1, 2)
    return (np.sin(2 * math.pi * freq * np.hypot(x - cx, y - cy) + phase) > 0).astype(np.float32)
  if texture == 'waves':
    return 0.5 + 0.5 * np.sin(2 * math.pi * freq * y + 2.0 * np.sin(2 * math.pi * 2 * x + phase))
  if texture == 'zigzag':
    tri = 2 * np.abs((freq * x + phase / (2 * math.pi)) % 1 - 0.5)
    return (np.sin(2 * math.pi * freq * (y + 0.25 * tri)) > 0).astype(np.float32)
  if texture == 'blotches':
    field = np.zeros_like(x)
    for _ in range(6):
      cx, cy = rng.uniform(0, 1, 2)
      field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(0.03, 0.08) ** 2))
    return (field > 0.5).astype(np.float32)
  raise ValueError(f'unknown texture {texture!r}')


def _hsv_colour(rng: np.random.Generator, saturation=(0.5, 1.0), value=(0.5, 1.0)) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation),
                                      rng.uniform(*value)), np.float32)


@dataclasses.dataclass(frozen=True)
class ShapesParams:
  """What a synthetic-shapes image looks like.

  Attributes:
    image_size: side in pixels.
    spurious_rate: probability that the textured patch shows the class's own
      texture (the rest get a misleading texture of another class).
    scale_range: object radius as a fraction of the image side.
    patch_area: range of the textured patch's area fraction.
    noise: std of the Gaussian pixel noise (images in [0, 1]).
    colours: ``'random'``: background, texture and object colours drawn per
      image; ``'fixed'``: the same grey background, white/black texture and
      red object in every image (:data:`FIXED_COLOURS`). Self-supervised
      pre-training needs ``'fixed'``: with random colours, telling two images
      apart is solved by their palettes (SimCLR/BYOL encoders trained on them
      stay at chance on shapes and textures), with fixed colours only shape,
      texture, size and position are left to learn.
    contrast_range: range of the object's contrast factor c: its colour is
      ``background + c * (object colour - background)`` (1: today's images;
      small: a faint object).
    occlusion_range: range of the share of the object's pixels hidden by
      clutter, a blob drawn over it (0: none).
  """
  image_size: int = 64
  spurious_rate: float = 0.8
  scale_range: tuple[float, float] = (0.16, 0.32)
  patch_area: tuple[float, float] = (0.3, 0.6)
  noise: float = 0.06
  colours: str = 'random'
  contrast_range: tuple[float, float] = (1.0, 1.0)
  occlusion_range: tuple[float, float] = (0.0, 0.0)

  def __post_init__(self):
    if self.colours not in ('random', 'fixed'):
      raise ValueError(f"colours must be 'random' or 'fixed', got {self.colours!r}.")
    for name, (lo, hi), top in (('contrast_range', self.contrast_range, 1.0),
                                ('occlusion_range', self.occlusion_range, 0.95),
                                ('scale_range', self.scale_range, 0.5)):
      if not 0 <= lo <= hi <= top:
        raise ValueError(f'{name} must be (lo, hi) with 0 <= lo <= hi <= {top}, got {(lo, hi)}.')

  @property
  def varies_difficulty(self) -> bool:
    """Whether contrast or occlusion are drawn (draws the default images never make)."""
    return self.contrast_range != (1.0, 1.0) or self.occlusion_range != (0.0, 0.0)


# background, texture colour a, texture colour b, object ('fixed' colours).
FIXED_COLOURS = tuple(np.array(c, np.float32) for c in
                      ((0.5, 0.5, 0.5), (0.95, 0.95, 0.95), (0.1, 0.1, 0.1), (0.9, 0.3, 0.2)))
# The clutter over an occluded object ('fixed' colours).
FIXED_CLUTTER_COLOUR = np.array((0.3, 0.3, 0.3), np.float32)


def render_example(params: ShapesParams, rng: np.random.Generator, label: int | None = None):
  """One image and its ground truth.

  Args:
    params: the rendering parameters (:class:`ShapesParams`).
    rng: the example's generator; every random draw comes from it.
    label: the shape's class (default: drawn from ``rng``).
  Returns:
    dict with ``image`` uint8 (S, S, 3), ``label``, ``texture``,
    ``misleading`` (bool), ``core_mask`` and ``spurious_mask`` uint8 (S, S, 1)
    in {0, 255} (the masks of every qscore_jax dataset are 0..255).
  """
  size = params.image_size
  label = int(rng.integers(len(SHAPES))) if label is None else label
  if rng.uniform() < params.spurious_rate:
    texture = label
  else:
    texture = int((label + rng.integers(1, len(TEXTURES))) % len(TEXTURES))

  # Pixel centres, with 2x2 supersampling for smooth object edges.
  sub = (np.arange(2 * size) + 0.5) / (2 * size)
  ys, xs = np.meshgrid(sub, sub, indexing='ij')
  centre = (np.arange(size) + 0.5) / size
  y, x = np.meshgrid(centre, centre, indexing='ij')

  radius = rng.uniform(*params.scale_range)
  cx, cy = rng.uniform(radius, 1 - radius, 2)
  angle = rng.uniform(0, 2 * math.pi)
  cos, sin = math.cos(angle), math.sin(angle)

  def object_frame(px, py):
    dx, dy = (px - cx) / radius, (py - cy) / radius
    return cos * dx + sin * dy, -sin * dx + cos * dy

  coverage = shape_coverage(SHAPES[label], *object_frame(xs, ys)).astype(np.float32)
  alpha = coverage.reshape(size, 2, size, 2).mean(axis=(1, 3))
  core = alpha >= 0.5

  # The textured patch: a random rectangle of the chosen area fraction.
  area = rng.uniform(*params.patch_area)
  aspect = rng.uniform(0.6, 1.6)
  height = min(1.0, math.sqrt(area * aspect))
  width = min(1.0, area / height)
  top, left = rng.uniform(0, 1 - height), rng.uniform(0, 1 - width)
  patch = (y >= top) & (y < top + height) & (x >= left) & (x < left + width)

  # The colours are drawn in both modes, so 'fixed' keeps every other draw of 'random'.
  background = _hsv_colour(rng, saturation=(0.0, 0.4), value=(0.3, 0.8))
  pattern = texture_pattern(TEXTURES[texture], x, y, rng)[..., None]
  colour_a, colour_b = _hsv_colour(rng), _hsv_colour(rng, value=(0.1, 0.5))
  colour_object = _hsv_colour(rng)
  if params.colours == 'fixed':
    background, colour_a, colour_b, colour_object = FIXED_COLOURS
  # Difficulty: drawn only where the configuration varies it, so that the images of the
  # other configurations keep their bytes.
  contrast, occluder = 1.0, np.zeros((size, size), bool)
  if params.varies_difficulty:
    contrast = rng.uniform(*params.contrast_range)
    colour_object = background + contrast * (colour_object - background)
    occluder = _occluder(core, rng.uniform(*params.occlusion_range), rng.uniform(0, 2 * math.pi),
                         (cx, cy), radius, y, x)
    colour_clutter = _hsv_colour(rng, saturation=(0.0, 0.6), value=(0.2, 0.9))
    if params.colours == 'fixed':  # no colour that tells two images apart (see ShapesParams)
      colour_clutter = FIXED_CLUTTER_COLOUR
  image = np.broadcast_to(background, (size, size, 3)).copy()
  image = np.where(patch[..., None], pattern * colour_a + (1 - pattern) * colour_b, image)
  image = (1 - alpha[..., None]) * image + alpha[..., None] * colour_object
  if occluder.any():
    image = np.where(occluder[..., None], colour_clutter, image)
  brightness = rng.uniform(0.8, 1.2)
  image = image * brightness + rng.normal(0, params.noise, image.shape)
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  visible = core & ~occluder
  return {
      'image': image,
      'label': label,
      'texture': texture,
      'misleading': texture != label,
      'core_mask': (visible * 255).astype(np.uint8)[..., None],
      'spurious_mask': ((patch & ~core & ~occluder) * 255).astype(np.uint8)[..., None],
      # Difficulty, exact: from the masks and the colours drawn (before noise).
      'object_area': np.float32(core.mean()),
      'occlusion': np.float32((core & occluder).sum() / max(core.sum(), 1)),
      'contrast': np.float32(np.abs(np.clip(brightness * colour_object, 0, 1)
                                    - np.clip(brightness * background, 0, 1)).mean()),
  }


def _occluder(core: np.ndarray, share: float, direction: float, centre: tuple[float, float],
              radius: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Clutter over the object: the part of a disk around it beyond a line across it.

  The line is perpendicular to ``direction`` and placed so that ``share`` of the
  object's pixels lie beyond it (the quantile of their positions along
  ``direction``); the disk (1.4 object radii) keeps the clutter near the object.

  Args:
    core: (S, S) bool, the object's pixels.
    share: target share of them to hide, in [0, 1).
    direction: angle of the line's normal, radians.
    centre: the object's centre (x, y), in image units.
    radius: the object's radius, in image units.
    y: (S, S) pixel-centre rows, in image units.
    x: (S, S) pixel-centre columns, likewise.
  Returns:
    (S, S) bool: the clutter's pixels (none if ``share`` is 0 or the object is empty).
  """
  if share <= 0 or not core.any():
    return np.zeros_like(core)
  along = (x - centre[0]) * math.cos(direction) + (y - centre[1]) * math.sin(direction)
  cut = np.quantile(along[core], 1 - share)
  near = np.hypot(x - centre[0], y - centre[1]) <= 1.4 * radius
  return near & (along > cut)


def generate(params: ShapesParams, seed: int, split: str, index: int):
  """Example ``index`` of ``split``: a pure function of its arguments.

  Args:
    params: the rendering parameters (:class:`ShapesParams`).
    seed: the configuration's seed.
    split: ``'train'`` or ``'test'``.
    index: the example's index in the split.
  Returns:
    The dict of :func:`render_example`.
  """
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  return render_example(params, rng)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """A synthetic-shapes configuration: the rendering parameters, sizes and seed.

  Besides tfds' ``BuilderConfig`` fields (``name``, ``description``, ...):

  Attributes:
    image_size: side in pixels (default 64).
    spurious_rate: probability of the class's own texture (default 0.8).
    num_train: examples of the train split (default 4000).
    num_test: examples of the test split (default 1000).
    seed: generation seed (default 0).
    colours: ``'random'`` (default) or ``'fixed'`` (:class:`ShapesParams`).
    scale_range: object radius range, as a fraction of the side (:class:`ShapesParams`).
    contrast_range: range of the object's contrast factor (default (1, 1): full).
    occlusion_range: range of the share of the object hidden by clutter (default none).
  """
  image_size: int = 64
  spurious_rate: float = 0.8
  num_train: int = 4000
  num_test: int = 1000
  seed: int = 0
  colours: str = 'random'
  scale_range: tuple[float, float] = ShapesParams.scale_range
  contrast_range: tuple[float, float] = (1.0, 1.0)
  occlusion_range: tuple[float, float] = (0.0, 0.0)

  def params(self) -> ShapesParams:
    """The :class:`ShapesParams` of this configuration (other parameters at their defaults)."""
    return ShapesParams(image_size=self.image_size, spurious_rate=self.spurious_rate,
                        colours=self.colours, scale_range=self.scale_range,
                        contrast_range=self.contrast_range, occlusion_range=self.occlusion_range)


# The difficulty ranges of weak_evidence and mixed: objects from small to large, from faint
# to full contrast, up to half hidden by clutter. Chosen so that the network of the study
# can learn them: a supervised ResNet-18 x0.25 (3,000 steps of 64) reaches 75% on the test
# split, 55% on the quarter of images with the least visible evidence and 90% on the quarter
# with the most. The ranges of 1.1.0 (radius 0.08-0.32, contrast 0.12-1, occlusion 0-0.6)
# left it at 13% after 800 steps: chance is 10%.
WEAK_EVIDENCE = {'scale_range': (0.18, 0.45), 'contrast_range': (0.25, 1.0),
                 'occlusion_range': (0.0, 0.5)}


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """10 shapes over spurious textured patches, with core and spurious masks."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Difficulty labels (object_area, occlusion, contrast) and the '
                            'weak_evidence, spurious and mixed configurations; the images of '
                            'the earlier configurations are unchanged.',
                   '1.2.0': 'weak_evidence and mixed: objects larger and less faint or occluded '
                            '(radius 0.18-0.45, contrast 0.25-1, occlusion 0-0.5), so that a '
                            'network of the study\'s size can learn them; the other '
                            'configurations are unchanged.'}
  BUILDER_CONFIGS = [
      ShapesConfig(name='default', description='64x64, 4000 train / 1000 test, spurious rate 0.8.'),
      ShapesConfig(name='small', image_size=32, num_train=2000, num_test=500,
                   description='32x32, 2000 train / 500 test, spurious rate 0.8.'),
      ShapesConfig(name='tiny', image_size=32, num_train=256, num_test=128,
                   description='32x32, 256 train / 128 test: for tests and CI.'),
      ShapesConfig(name='fixed_colours', colours='fixed',
                   description='64x64, 4000 train / 1000 test, spurious rate 0.8, the same '
                               'colours in every image (for self-supervised pre-training).'),
      ShapesConfig(name='fixed_colours_small', image_size=32, num_train=2000, num_test=500,
                   colours='fixed',
                   description='32x32, 2000 train / 500 test, fixed colours (the data of '
                               '`qscore demo`).'),
      # The study's configurations (`qscore study`): 32 px, fixed colours, errors of known source.
      ShapesConfig(name='weak_evidence', image_size=32, num_train=2000, num_test=500,
                   colours='fixed', spurious_rate=0.1, **WEAK_EVIDENCE,
                   description='32x32, 2000 train / 500 test, fixed colours; objects of widely '
                               'varying size, contrast and occlusion; the texture is independent '
                               'of the class (errors from weak evidence).'),
      ShapesConfig(name='spurious', image_size=32, num_train=2000, num_test=500, colours='fixed',
                   description='32x32, 2000 train / 500 test, fixed colours: the images of '
                               'fixed_colours_small under the study\'s name (easy objects, '
                               'texture = class for 80%; errors from the misleading cue).'),
      ShapesConfig(name='mixed', image_size=32, num_train=2000, num_test=500, colours='fixed',
                   **WEAK_EVIDENCE,
                   description='32x32, 2000 train / 500 test, fixed colours: the difficulty of '
                               'weak_evidence and the texture cue of spurious (both sources).'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'label': tfds.features.ClassLabel(names=list(SHAPES)),
            'texture': tfds.features.ClassLabel(names=list(TEXTURES)),
            'misleading': tfds.features.Scalar(dtype=np.bool_),
            'core_mask': tfds.features.Image(shape=(size, size, 1)),
            'spurious_mask': tfds.features.Image(shape=(size, size, 1)),
            'object_area': tfds.features.Scalar(dtype=np.float32),
            'occlusion': tfds.features.Scalar(dtype=np.float32),
            'contrast': tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=('image', 'label'),
        # Keep generation order, so that example i of a split is the i-th generated.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train),
            'test': self._generate_examples('test', config.num_test)}

  def _generate_examples(self, split, count):
    config = self.builder_config
    params = config.params()
    for index in range(count):
      yield index, generate(params, config.seed, split, index)
