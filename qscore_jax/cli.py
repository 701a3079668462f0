"""The ``qscore`` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_models(args: argparse.Namespace) -> int:
  from qscore_jax.models import list_models  # pylint: disable=import-outside-toplevel
  specs = list_models(args.method)
  if args.json:
    print(json.dumps([{
        'id': s.id, 'method': s.method, 'arch': s.arch,
        'arch_options': dict(s.arch_options), 'preprocessing': s.preprocessing.name,
        'url': s.url, 'container': s.container, 'supported': s.supported,
        'reason': s.reason} for s in specs], indent=2))
    return 0
  width = max(len(s.id) for s in specs)
  print(f"{'id':<{width}}  {'method':<11} {'arch':<10} {'preprocessing':<16} options")
  for s in specs:
    options = ', '.join(f'{k}={v}' for k, v in s.arch_options.items())
    status = '' if s.supported else f'  [not supported: {s.reason}]'
    print(f'{s.id:<{width}}  {s.method:<11} {s.arch:<10} {s.preprocessing.name:<16} '
          f'{options}{status}')
  print(f'\n{len(specs)} checkpoints; `qscore models --json` adds URLs.')
  return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
  from qscore_jax import summary  # pylint: disable=import-outside-toplevel
  report = summary.inspect_model(args.model, batch_size=args.batch_size,
                                 image_size=args.image_size, seed=args.seed)
  print(json.dumps(report, indent=2) if args.json else summary.format_report(report))
  return 0


def _parse_option(text: str) -> tuple[str, object]:
  """``key=value`` with the value read as int, float, bool or string."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
  for cast in (int, float):
    try:
      return key, cast(value)
    except ValueError:
      pass
  if value.lower() in ('true', 'false'):
    return key, value.lower() == 'true'
  return key, value


def _cmd_convert(args: argparse.Namespace) -> int:
  from qscore_jax import convert  # pylint: disable=import-outside-toplevel
  converted = convert.convert_checkpoint(
      args.model_id, file=args.file, method=args.method, arch=args.arch,
      arch_options=dict(args.arch_option or []), submodel=args.submodel, out_dir=args.out,
      overwrite=args.overwrite, progress=not args.no_progress)
  meta = converted.metadata
  provenance = meta['provenance']
  heads = ', '.join(f'{name} ({len(spec["layers"])} layers)' for name, spec in meta['heads'].items())
  options = ', '.join(f'{k}={v}' for k, v in meta['arch_options'].items())
  print(f"converted    {meta['model_id'] or meta['method']} -> {converted.directory}")
  print(f"backbone     {meta['arch']}{' (' + options + ')' if options else ''}, "
        f"{converted.model.num_features}-d representation, sub-model {provenance['submodel']}")
  print(f"heads        {heads or 'none in the file'}")
  for source in provenance['source_files']:
    print(f"source       {source['name']}  sha256 {source['sha256']}")
  dropped = '; '.join(f'{reason} ({n})' for reason, n in provenance['dropped'].items())
  print(f"dropped      {dropped or 'nothing'}")
  return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
  from qscore_jax import data  # pylint: disable=import-outside-toplevel
  if args.name is None:
    from qscore_jax.data import datasets  # pylint: disable=import-outside-toplevel
    print(datasets.__doc__.split('\n\n', 1)[1].split('\n\n:func:')[0])
    return 0
  info = data.dataset_info(args.name, args.data_dir)
  splits = ', '.join(f'{split} {count}' for split, count in sorted(info.splits.items()))
  print(f'{info.name}: {info.num_classes} classes, splits: {splits}')
  print(f'  image shape {info.image_shape}; features {", ".join(info.features)}'
        + ('; core/spurious masks' if info.has_masks else ''))
  names = ', '.join(info.class_names[:12]) + (' ...' if info.num_classes > 12 else '')
  print(f'  classes: {names}')
  return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
  from qscore_jax import data  # pylint: disable=import-outside-toplevel
  extra = {}
  if args.name.startswith('salient_imagenet'):
    if not (args.salient_dir and args.annotations):
      raise ValueError('preparing salient_imagenet needs --salient-dir (the published '
                       'salient_imagenet_dataset folder) and --annotations '
                       '(mturk_results/discover_spurious_features.csv).')
    extra = {'salient_dir': args.salient_dir, 'annotations': args.annotations,
             'imagenet_train_dir': args.imagenet_train_dir}
  data.prepare(args.name, args.data_dir, **extra)
  return _cmd_datasets(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='qscore',
      description='Q-Score analysis of self-supervised image representations (JAX/Flax).')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  models = commands.add_parser(
      'models', help='list the registered official checkpoints',
      description='List the published SSL checkpoints qscore_jax knows: id, method, '
                  'architecture, preprocessing and the options the weights cannot reveal.')
  models.add_argument('--method', help='only this method (simclr, swav, moco, mocov3, '
                      'byol, dino, simsiam, vicreg, barlowtwins)')
  models.add_argument('--json', action='store_true', help='print JSON, with URLs')
  models.set_defaults(func=_cmd_models)

  convert = commands.add_parser(
      'convert', help='convert an official checkpoint into a qscore_jax model',
      description='Convert a published SSL checkpoint into an orbax checkpoint plus metadata '
                  '(default directory checkpoints/<model-id>/). Give a registry id to download '
                  'the official file (cached in $QSCORE_JAX_CACHE or ~/.cache/qscore_jax, '
                  'verified against the registry digest when known), or --file with --method '
                  '(and optionally --arch) for a local file. Every parameter must be filled '
                  'exactly once and every key of the file used or dropped by an explicit rule.')
  convert.add_argument('model_id', nargs='?', help='registry id (qscore models), e.g. dino-vits16')
  convert.add_argument('--file', help='local checkpoint: .pth/.pth.tar/.ckpt, TF1 prefix, '
                       '.index or .zip, or BYOL .pkl')
  convert.add_argument('--method', help='simclr, swav, moco, mocov3, byol, dino, simsiam, vicreg, '
                       'barlowtwins or solo-learn (needed without a registry id)')
  convert.add_argument('--arch', help='architecture (e.g. resnet50, vit_small); inferred from '
                       'the file when omitted')
  convert.add_argument('--arch-option', action='append', type=_parse_option, metavar='KEY=VALUE',
                       help='architecture option the weights cannot reveal, e.g. num_heads=12 '
                       'or conv_padding=tf_same (repeatable)')
  convert.add_argument('--submodel', help='which network of the file: DINO teacher|student, BYOL '
                       'online|target, MoCo query|key, MoCo v3 base|momentum, SimCLR base|ema, '
                       'solo-learn base|momentum (default: the one the authors evaluate)')
  convert.add_argument('--out', help='output directory (default checkpoints/<model-id>)')
  convert.add_argument('--overwrite', action='store_true', help='replace an existing output')
  convert.add_argument('--no-progress', action='store_true', help='no download progress bar')
  convert.set_defaults(func=_cmd_convert)

  datasets = commands.add_parser(
      'datasets', help='describe a dataset, or list how datasets are named',
      description='Without a name: the dataset naming scheme (built-in datasets, tfds names, '
                  'image folders). With a name: its classes, splits and features (generated '
                  'datasets are prepared on the way).')
  datasets.add_argument('name', nargs='?', help='e.g. synthetic_shapes, cifar10, folder:/path')
  datasets.add_argument('--data-dir', help='tfds data directory (default $QSCORE_JAX_DATA_DIR '
                        'or ~/tensorflow_datasets)')
  datasets.set_defaults(func=_cmd_datasets)

  prepare = commands.add_parser(
      'prepare', help='prepare a dataset (imagenet2012, imagenet100, salient_imagenet, ...)',
      description='Prepare a dataset in the tfds data directory: imagenet2012 from the manual '
                  'download in <data-dir>/downloads/manual, imagenet100 from a prepared '
                  'imagenet2012, salient_imagenet from the published Salient ImageNet folder, '
                  'downloadable tfds datasets by downloading them.')
  prepare.add_argument('name', help='dataset name')
  prepare.add_argument('--data-dir', help='tfds data directory')
  prepare.add_argument('--salient-dir', help='salient_imagenet: the published dataset folder')
  prepare.add_argument('--annotations', help='salient_imagenet: discover_spurious_features.csv')
  prepare.add_argument('--imagenet-train-dir', help='salient_imagenet: read images from an '
                       'ImageNet train folder (<wnid>/<name>.JPEG) instead of imagenet2012')
  prepare.set_defaults(func=_cmd_prepare)

  inspect = commands.add_parser(
      'inspect', help='embed a generated batch with a model and print representation statistics',
      description='Build a backbone (random weights) from a registry id or architecture name, '
                  'or load a saved model directory, embed a batch of generated images with '
                  'the jitted forward pass, and print throughput and the statistics Q-Score is '
                  'built on (per-sample mean/std, highly active features).')
  inspect.add_argument('model', help='registry id (e.g. dino-vits16), architecture '
                       '(e.g. resnet50) or a directory written by save_model')
  inspect.add_argument('--batch-size', type=int, default=8, help='images in the batch (default 8)')
  inspect.add_argument('--image-size', type=int, default=None,
                       help="square input side (default: the model's preprocessing size)")
  inspect.add_argument('--seed', type=int, default=0, help='seed of images and random weights')
  inspect.add_argument('--json', action='store_true', help='print the report as JSON')
  inspect.set_defaults(func=_cmd_inspect)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as error:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f'qscore {args.command}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
