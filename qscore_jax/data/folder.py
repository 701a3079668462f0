"""A folder of images, one sub-folder per class, as a dataset.

Layouts::

    root/<class>/<image>                 one split, called 'train'
    root/<split>/<class>/<image>         splits named train, val, validation or test

Classes are the sub-folder names in sorted order (label = position, as
torchvision's ``ImageFolder``); images are sorted by path, and the position of
an image in that order is its stable id. Readable formats: JPEG, PNG, BMP, GIF
(first frame). Every image is decoded once when the folder is scanned, so a
damaged file is reported by name before any pipeline runs.
"""

from __future__ import annotations

import dataclasses
import pathlib

from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
SPLIT_NAMES = ('train', 'val', 'validation', 'test')


class FolderError(ValueError):
  """An image folder is missing, empty, malformed or holds unreadable images."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """A scanned image folder: class names and, per split, sorted (path, label) pairs.

  Attributes:
    root: the folder.
    class_names: the class sub-folder names, sorted (label = position).
    splits: ``{split: ((path, label), ...)}`` sorted by path; ``'train'`` only
      for a folder without split sub-folders.
  """
  root: pathlib.Path
  class_names: tuple[str, ...]
  splits: dict[str, tuple[tuple[str, int], ...]]


def _images_by_class(directory: pathlib.Path, class_names: list[str]):
  items = []
  for label, name in enumerate(class_names):
    folder = directory / name
    if not folder.is_dir():
      continue
    for path in sorted(folder.rglob('*')):
      if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        items.append((str(path), label))
  return items


def _check_readable(items, limit_report: int = 5) -> None:
  bad = []
  for path, _ in items:
    try:
      with Image.open(path) as image:
        image.load()  # a full decode: truncated files fail here, not in the pipeline
    except Exception as error:  # pylint: disable=broad-except  # PIL raises many types
      bad.append(f'{path} ({type(error).__name__}: {str(error).splitlines()[0][:120]})')
  if bad:
    shown = '; '.join(bad[:limit_report])
    more = f' and {len(bad) - limit_report} more' if len(bad) > limit_report else ''
    raise FolderError(f'{len(bad)} image(s) cannot be decoded: {shown}{more}. '
                      'Remove or replace them, then run again.')


def scan_image_folder(root: str | pathlib.Path, *, verify: bool = True) -> ImageFolder:
  """Lists (and by default decodes once) every image of an image folder.

  Args:
    root: the folder (layouts: module docstring).
    verify: decode every image once, reporting damaged files by name (default
      True).
  Raises:
    FolderError: missing, empty or malformed folder, or unreadable images.
  """
  root = pathlib.Path(root).expanduser()
  if not root.exists():
    raise FolderError(f'image folder {root} does not exist.')
  if not root.is_dir():
    raise FolderError(f'{root} is a file, not a folder of class sub-folders.')
  subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not subdirs:
    raise FolderError(f'{root} has no sub-folders: put each class\'s images in its own '
                      'sub-folder (root/<class>/<image>).')
  if set(subdirs) <= set(SPLIT_NAMES):
    split_dirs = {name: root / name for name in subdirs}
    class_names = sorted({p.name for d in split_dirs.values() for p in d.iterdir()
                          if p.is_dir() and not p.name.startswith('.')})
  else:
    split_dirs = {'train': root}
    class_names = subdirs
  if not class_names:
    raise FolderError(f'{root} has split folders but no class sub-folders inside them.')
  splits = {}
  for split, directory in split_dirs.items():
    items = _images_by_class(directory, class_names)
    if not items:
      raise FolderError(f'{directory} holds no images ({", ".join(IMAGE_SUFFIXES)}) in its '
                        f'class sub-folders {class_names[:5]}.')
    if verify:
      _check_readable(items)
    splits[split] = tuple(items)
  return ImageFolder(root, tuple(class_names), splits)
