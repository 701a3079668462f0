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
  except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError,
          NotImplementedError) as error:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f'qscore {args.command}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
