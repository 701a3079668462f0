"""SSL training augmentations: each method's view recipe, deterministic per example.

A :class:`Recipe` is a tuple of :class:`ViewSpec`; each view of an image is a
random resized crop, horizontal flip, colour jitter (torchvision semantics:
brightness/contrast/saturation blend, hue rotation, in a random order),
grayscale, Gaussian blur and solarization, each with the recipe's probability.
All randomness is TensorFlow's *stateless* ops seeded from ``(seed, epoch,
example id, view)``, so the views of an example are a pure function of those
numbers: independent of batch composition, sharding, number of processes and
of anything that ran before.

Recipes (from each method's training code): ``simclr`` (strong jitter 0.8/0.2,
blur 0.5), ``byol`` / ``mocov3`` / ``vicreg`` / ``barlowtwins`` (asymmetric:
blur 1.0/0.1, solarize 0/0.2), ``moco`` (v2) / ``simsiam`` (crop scale 0.2,
blur 0.5), ``swav`` (2 x 224 + 6 x 96 multi-crop), ``dino`` (2 global +
8 local crops, asymmetric blur/solarize). ``image_size`` and ``local_size``
rescale them for small images (blur kernels are 10% of the crop side).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How one view is drawn (probabilities in [0, 1]).

  Attributes:
    size: side of the square output view, in pixels.
    scale: area range of the random resized crop, as fractions of the image
      (default 0.08 to 1).
    ratio: aspect-ratio range of the crop (default 3/4 to 4/3).
    flip: probability of a horizontal flip (default 0.5).
    jitter: probability of colour jitter (default 0.8).
    brightness: jitter factor drawn in [max(0, 1 - b), 1 + b] (default 0.4).
    contrast: likewise for contrast (default 0.4).
    saturation: likewise for saturation (default 0.2).
    hue: hue shift drawn in [-hue, hue] (default 0.1).
    grayscale: probability of converting to grayscale (default 0.2).
    blur: probability of a Gaussian blur (default 0).
    blur_sigma: range of the blur's sigma in pixels (default 0.1 to 2).
    solarize: probability of solarizing at 0.5 (default 0).
  """
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  jitter: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale: float = 0.2
  blur: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize: float = 0.0

  @property
  def blur_kernel(self) -> int:
    """The blur kernel's side: odd, about 10% of ``size``, at least 3."""
    return max(3, int(0.1 * self.size) // 2 * 2 + 1)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method's augmentation recipe: one :class:`ViewSpec` per view.

  Attributes:
    name: the method (or a free name).
    views: the views drawn from each image, in order.
  """
  name: str
  views: tuple[ViewSpec, ...]


def recipe(method: str, *, image_size: int = 224, local_size: int | None = None,
           num_local: int | None = None, min_crop_scale: float | None = None) -> Recipe:
  """The augmentation recipe of a method, at ``image_size`` (and ``local_size`` crops).

  ``min_crop_scale`` replaces the lower bound of the *global* views' crop area
  (e.g. 0.4 instead of 0.08 for short pre-training on small images, where two
  crops of 8% of a 32-pixel image rarely share anything); local crops keep
  theirs.

  Args:
    method: ``simclr``, ``byol``, ``mocov3``, ``vicreg``, ``barlowtwins``,
      ``moco``/``mocov2``, ``simsiam``, ``swav`` or ``dino``.
    image_size: side of the global views (default 224).
    local_size: side of the local crops of SwAV/DINO (default
      ``round(image_size * 96 / 224)``, at least 8).
    num_local: number of local crops (default 6 for SwAV, 8 for DINO).
    min_crop_scale: new lower bound of the global views' crop area, in (0, 1].
  Raises:
    ValueError: no recipe for ``method``.
  """
  if min_crop_scale is not None and not 0 < min_crop_scale <= 1:
    raise ValueError(f'min_crop_scale must be in (0, 1], got {min_crop_scale}.')
  base = _recipe(method, image_size, local_size, num_local)
  if min_crop_scale is None:
    return base
  return Recipe(base.name, tuple(
      dataclasses.replace(v, scale=(min_crop_scale, v.scale[1])) if v.size == image_size else v
      for v in base.views))


def _recipe(method: str, image_size: int, local_size: int | None, num_local: int | None
            ) -> Recipe:
  s = image_size
  local = local_size or max(8, round(image_size * 96 / 224))
  strong = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
  if method == 'simclr':
    return Recipe(method, (ViewSpec(s, blur=0.5, **strong),) * 2)
  if method in ('byol', 'mocov3', 'vicreg', 'barlowtwins'):
    return Recipe(method, (ViewSpec(s, blur=1.0), ViewSpec(s, blur=0.1, solarize=0.2)))
  if method in ('moco', 'mocov2', 'simsiam'):
    view = ViewSpec(s, scale=(0.2, 1.0), saturation=0.4, blur=0.5)
    return Recipe(method, (view, view))
  if method == 'swav':
    n = 6 if num_local is None else num_local
    global_view = ViewSpec(s, scale=(0.14, 1.0), blur=0.5, **strong)
    local_view = ViewSpec(local, scale=(0.05, 0.14), blur=0.5, **strong)
    return Recipe(method, (global_view,) * 2 + (local_view,) * n)
  if method == 'dino':
    n = 8 if num_local is None else num_local
    return Recipe(method, (ViewSpec(s, scale=(0.4, 1.0), blur=1.0),
                           ViewSpec(s, scale=(0.4, 1.0), blur=0.1, solarize=0.2))
                  + (ViewSpec(local, scale=(0.05, 0.4), blur=0.5),) * n)
  raise ValueError(f'No augmentation recipe for {method!r}; known: simclr, byol, mocov3, '
                   'vicreg, barlowtwins, moco, simsiam, swav, dino.')


def _grayscale(tf, image):
  """ITU-R 601-2 luma, as torchvision and PIL (H, W, 1)."""
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _color_jitter(tf, image, spec: ViewSpec, seed):
  seeds = tf.random.experimental.stateless_split(seed, 5)
  factor = lambda s, amount: tf.random.stateless_uniform(  # pylint: disable=unnecessary-lambda-assignment
      [], s, max(0.0, 1 - amount), 1 + amount)
  brightness = factor(seeds[0], spec.brightness)
  contrast = factor(seeds[1], spec.contrast)
  saturation = factor(seeds[2], spec.saturation)
  hue = tf.random.stateless_uniform([], seeds[3], -spec.hue, spec.hue)
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[4]))

  def apply(index, img):
    def adjust_brightness():
      return tf.clip_by_value(img * brightness, 0.0, 1.0)

    def adjust_contrast():
      mean = tf.reduce_mean(_grayscale(tf, img))
      return tf.clip_by_value((img - mean) * contrast + mean, 0.0, 1.0)

    def adjust_saturation():
      gray = _grayscale(tf, img)
      return tf.clip_by_value((img - gray) * saturation + gray, 0.0, 1.0)

    def adjust_hue():
      return tf.image.adjust_hue(img, hue)

    return tf.switch_case(index, [adjust_brightness, adjust_contrast, adjust_saturation,
                                  adjust_hue])

  for step in range(4):
    image = apply(order[step], image)
  return image


def _gaussian_blur(tf, image, spec: ViewSpec, seed):
  sigma = tf.random.stateless_uniform([], seed, *spec.blur_sigma)
  radius = spec.blur_kernel // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-x ** 2 / (2.0 * sigma ** 2))
  kernel /= tf.reduce_sum(kernel)
  batch = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'REFLECT')
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  batch = tf.nn.depthwise_conv2d(batch, vertical, [1, 1, 1, 1], 'VALID')
  batch = tf.nn.depthwise_conv2d(batch, horizontal, [1, 1, 1, 1], 'VALID')
  return batch[0]


def _maybe(tf, probability: float, seed, fn, image):
  if probability <= 0:
    return image
  if probability >= 1:
    return fn(image)
  draw = tf.random.stateless_uniform([], seed)
  return tf.cond(draw < probability, lambda: fn(image), lambda: image)


def augment_view(image, spec: ViewSpec, seed):
  """One view of a uint8 image (H, W, 3): float32 (size, size, 3) in [0, 1].

  Args:
    image: uint8 tensor (H, W, 3).
    spec: the view's :class:`ViewSpec`.
    seed: a stateless seed, shape (2,) int32/int64.
  """
  # TF only when views are drawn: Recipe, ViewSpec and recipe() are plain data.
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  seeds = tf.random.experimental.stateless_split(seed, 8)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
      min_object_covered=0.0, aspect_ratio_range=spec.ratio, area_range=spec.scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  view = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, [spec.size, spec.size],
                         method='bilinear', antialias=True)
  view = tf.clip_by_value(view, 0.0, 1.0)
  view = _maybe(tf, spec.flip, seeds[1], tf.image.flip_left_right, view)
  view = _maybe(tf, spec.jitter, seeds[2], lambda v: _color_jitter(tf, v, spec, seeds[3]), view)
  view = _maybe(tf, spec.grayscale, seeds[4], lambda v: tf.tile(_grayscale(tf, v), [1, 1, 3]),
                view)
  view = _maybe(tf, spec.blur, seeds[5], lambda v: _gaussian_blur(tf, v, spec, seeds[6]), view)
  view = _maybe(tf, spec.solarize, seeds[7], lambda v: tf.where(v < 0.5, v, 1.0 - v), view)
  return tf.reshape(view, [spec.size, spec.size, 3])


def example_seed(seed: int, epoch, example_id):
  """The stateless seed of an example in an epoch: a pure function of the three.

  Args:
    seed: the run's seed (Python int).
    epoch: the epoch (int or scalar tensor).
    example_id: the example's index in its split (int or scalar tensor).
  Returns:
    int64 tensor (2,).
  """
  # TF only when views are drawn: Recipe, ViewSpec and recipe() are plain data.
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  base = tf.constant([seed % (2 ** 31), seed // (2 ** 31) % (2 ** 31)], tf.int64)
  base = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(base, tf.cast(example_id, tf.int64))


def augment_views(image, recipe_: Recipe, seed):
  """All views of ``recipe_`` for one uint8 image; a tuple of float32 arrays in [0, 1].

  Args:
    image: uint8 tensor (H, W, 3).
    recipe_: the :class:`Recipe`; view v is (size_v, size_v, 3).
    seed: the example's stateless seed (:func:`example_seed`), split per view.
  """
  # TF only when views are drawn: Recipe, ViewSpec and recipe() are plain data.
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  seeds = tf.random.experimental.stateless_split(seed, len(recipe_.views))
  return tuple(augment_view(image, spec, seeds[i]) for i, spec in enumerate(recipe_.views))

