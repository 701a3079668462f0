"""The ``qscore`` command. Thin: it parses arguments, loads each model reference once
(:func:`qscore_jax.load_encoder`) and calls the library.

Each handler imports the library it calls inside itself, so that ``qscore
--help`` and a mistyped command answer without importing TensorFlow or the drivers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import pathlib
import sys
import warnings
from typing import Iterator, Sequence


def _cmd_models(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
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
  # Imported here, not at the top: `qscore --help` stays fast.
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
  # Imported here, not at the top: `qscore --help` stays fast.
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
  print(f"bookkeeping  {_describe_bookkeeping(provenance.get('file_metadata') or {})}")
  print(f"method from  {provenance.get('method_from')}; preprocessing from "
        f"{provenance.get('preprocessing_from')}")
  for record in provenance.get('neutralised') or []:
    print(f"not rebuilt  {record['global']} at {record['path']!r} (dropped: "
          f"{record['dropped_as']}; nothing was run)")
  return 0


def _describe_bookkeeping(metadata: dict) -> str:
  """One line of what the file held besides arrays: scalars shown, containers sized."""
  parts = []
  for path, value in metadata.items():
    if isinstance(value, (dict, list)):
      parts.append(f'{path} ({len(value)} entries)' if value else f'{path} (empty)')
    else:
      text = str(value)
      parts.append(f'{path}={text if len(text) <= 40 else text[:37] + "..."}')
  return ', '.join(parts[:12]) + (f', ... ({len(parts) - 12} more)' if len(parts) > 12 else '') \
      if parts else 'none'



def _cmd_datasets(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import data  # pylint: disable=import-outside-toplevel
  if args.name is None:
    # Imported here, not at the top: `qscore --help` stays fast.
    from qscore_jax.data import datasets  # pylint: disable=import-outside-toplevel
    print(datasets.listing())
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
  # Imported here, not at the top: `qscore --help` stays fast.
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


def _cmd_embed(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import models  # pylint: disable=import-outside-toplevel
  # Not `from qscore_jax import embed`: that name is the jitted forward pass.
  from qscore_jax.embed import embed_encoder  # pylint: disable=import-outside-toplevel
  path = embed_encoder(
      models.load_encoder(args.model, dtype=args.dtype), args.dataset, args.split, args.out,
      batch_size=args.batch_size, image_size=args.image_size, data_dir=args.data_dir,
      progress=not args.no_progress, overwrite=args.overwrite)
  # Imported here, not at the top: `qscore --help` stays fast.
  import jax  # pylint: disable=import-outside-toplevel
  from qscore_jax.store import RepresentationStore  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:  # every shard is written before any process describes the store
    # Imported here, not at the top: `qscore --help` stays fast.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('qscore embed: all shards written')
  store = RepresentationStore.open(path)  # checks what it describes: sizes, labels, ids
  print(f'store        {path}: {store.num_rows} x {store.dim} representations of '
        f'{args.dataset}/{args.split} ({len(store.shards)} shard(s))')
  return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import analysis, compression  # pylint: disable=import-outside-toplevel
  from qscore_jax.probe import ProbeConfig  # pylint: disable=import-outside-toplevel
  probe = ProbeConfig(epochs=args.probe_epochs, batch_size=args.probe_batch_size,
                      learning_rate=args.probe_lr, feature_norm=args.probe_feature_norm,
                      seed=args.seed)
  comp = None if args.no_compression else compression.CompressionConfig(
      random_seeds=tuple(range(args.compression_seeds)),
      probe=ProbeConfig(epochs=args.compression_probe_epochs, batch_size=args.probe_batch_size,
                        learning_rate=args.probe_lr, feature_norm=args.probe_feature_norm,
                        seed=args.seed))
  config = analysis.AnalysisConfig(eps=args.eps, band=tuple(args.band),
                                   nonzero_only=not args.all_features, probe=probe,
                                   compression=comp, knn_k=args.knn_k,
                                   bootstrap_resamples=args.bootstrap_resamples)
  result = analysis.analyze_stores(args.train, args.eval, args.out, config=config,
                                   data_dir=args.data_dir, overwrite=args.overwrite).report
  print('\n'.join(analysis.summary_lines(result)))
  print(f'report       {args.out}/report.json (+ scores.npz, {len(result.get("figures", {}))} plots)')
  return 0


def _cmd_train_supervised(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import supervised  # pylint: disable=import-outside-toplevel
  config = supervised.SupervisedConfig(
      arch=args.arch, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size,
      learning_rate=args.lr, seed=args.seed, data_dir=args.data_dir,
      arch_options=tuple(sorted(dict(args.arch_option or []).items())))
  path = supervised.train_supervised(config, args.out, overwrite=args.overwrite)
  print(f'saved        {path}')
  return 0


def load_config(spec: str, overrides: Sequence[str] = ()):
  """``name:args`` (a module of qscore_jax.configs) or ``path.py:args`` -> ConfigDict.

  Args:
    spec: ``NAME[:arg]`` (``qscore_jax/configs/NAME.py``) or ``FILE.py[:arg]``;
      ``arg`` (e.g. ``k=v,k2=v2``) is passed to the module's ``get_config``.
    overrides: ``key=value`` strings applied afterwards (dotted keys; see
      :func:`qscore_jax.configs.finetune.apply_overrides`).
  Raises:
    FileNotFoundError: the config file does not exist.
    ValueError: no built-in config of that name, or a bad override.
  """
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax.configs.finetune import apply_overrides  # pylint: disable=import-outside-toplevel
  name, _, arg = spec.partition(':')
  if name.endswith('.py'):
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'config file {path} does not exist.')
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f'qscore_jax.configs.{name}')
    except ModuleNotFoundError:
      raise ValueError(f'no built-in config {name!r}; give a module of qscore_jax/configs '
                       '(e.g. finetune) or a path to a .py file defining get_config(arg).') from None
  config = module.get_config(arg or None)
  return apply_overrides(config, overrides)


def _cmd_finetune(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax.finetune import loop  # pylint: disable=import-outside-toplevel
  config = load_config(args.config, [*(args.set or ()),
                                     *([f'dtype={args.dtype}'] if args.dtype else [])])
  try:
    result = loop.run(config, args.workdir, init=args.init, stop_after=args.stop_after)
  except loop.TrainingError as error:
    print(f'qscore finetune: error: {error}', file=sys.stderr)
    return 1
  metrics = result['metrics']
  print(f"step         {result['step']}" + (f"  loss {metrics['loss']:.4f}  mean Q "
                                              f"{metrics['qscore_mean']:.4f}" if metrics else ''))
  model = result['model']
  if model and '://' in str(args.workdir):
    model = f"{str(args.workdir).rstrip('/')}/model"
  print(f'workdir      {args.workdir}' + (f'  (model: {model})' if model else ''))
  return 0


def _progress(line: str) -> None:
  """A long command's progress line, shown at once even when stdout is a file or a pipe."""
  print(line, flush=True)


def _run_config_driver(args: argparse.Namespace, run, table_lines, written: str) -> int:
  """Loads ``--config`` with ``--set``, runs ``run(config, workdir)``, prints its table."""
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax.finetune import loop  # pylint: disable=import-outside-toplevel
  config = load_config(args.config, args.set or ())
  try:
    results = run(config, args.workdir, log=_progress)
  except loop.TrainingError as error:
    print(f'qscore {args.command}: error: {error}', file=sys.stderr)
    return 1
  print('\n'.join(table_lines(results)))
  print(f"took         {results['seconds']:.0f} s; results in {args.workdir}/results.json, "
        f"{written}")
  return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import experiment  # pylint: disable=import-outside-toplevel
  return _run_config_driver(args, experiment.run_experiment, experiment.table_lines, 'table.md')


def _cmd_study(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import study  # pylint: disable=import-outside-toplevel
  return _run_config_driver(args, study.run_study, study.table_lines, 'table.md, study.png')


def _cmd_track(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import track  # pylint: disable=import-outside-toplevel
  from qscore_jax.finetune import loop  # pylint: disable=import-outside-toplevel
  if '://' in str(args.workdir):
    raise ValueError(f'qscore track reads a local workdir; {args.workdir} is a URL. Copy it '
                     'first (e.g. gsutil -m cp -r URL DIR) and track DIR.')
  config = track.TrackConfig(dataset=args.dataset, split=args.split,
                             reference_split=args.reference_split,
                             lidar_examples=args.lidar_examples, lidar_views=args.lidar_views,
                             batch_size=args.batch_size, probe_epochs=args.probe_epochs)
  try:
    result = track.track(args.workdir, args.out, config=config, data_dir=args.data_dir,
                         keep_stores=args.keep_stores, log=_progress)
  except loop.TrainingError as error:
    print(f'qscore track: error: {error}', file=sys.stderr)
    return 1
  print('\n'.join(track.table_lines(result)))
  out = args.out or f'{args.workdir}/track'
  print(f'written      {out}/track.json, track.md, track.png')
  if result['skipped']:
    print(f"skipped      {len(result['skipped'])} checkpoint(s) that cannot be restored: "
          + ', '.join(str(s['step']) for s in result['skipped']))
  return 0


def _cmd_compare(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import analysis, models  # pylint: disable=import-outside-toplevel
  from qscore_jax.probe import ProbeConfig  # pylint: disable=import-outside-toplevel
  config = analysis.AnalysisConfig(probe=ProbeConfig(epochs=args.probe_epochs, seed=args.seed),
                                   compression=None)
  reports = analysis.compare_models(
      [models.load_encoder(ref, dtype=args.dtype) for ref in args.models], args.dataset, args.out,
      labels=args.models, train_split=args.train_split,
      eval_split=args.eval_split, batch_size=args.batch_size, data_dir=args.data_dir,
      config=config, progress=not args.no_progress)
  print('\n'.join(analysis.comparison_lines(reports)))
  print(f'reports      {args.out}/<i>-<model>/report.json')
  return 0


def _cmd_interpret(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import interpret, models, report  # pylint: disable=import-outside-toplevel
  if len(args.models) > 2:
    raise ValueError(f'give one model, or two to compare (before / after), not '
                     f'{len(args.models)}.')
  config = interpret.InterpretConfig(
      stage=args.stage, method=args.method, eps=args.eps, heatmap_threshold=args.heatmap_threshold,
      threshold_mode=args.threshold_mode, mask_threshold=args.mask_threshold)
  out = pathlib.Path(args.out)
  if len(args.models) == 2:  # out holds the two runs and comparison.json
    # Imported here, not at the top: `qscore --help` stays fast.
    from qscore_jax import outputs  # pylint: disable=import-outside-toplevel
    outputs.prepare_output(out, 'interpretation')
  results = []
  for index, ref in enumerate(args.models):
    target = out if len(args.models) == 1 else out / f'{index}-{pathlib.Path(ref).name}'
    results.append(interpret.interpret_model(
        models.load_encoder(ref, dtype=args.dtype), args.dataset, target, split=args.split,
        reference_dataset=args.reference_dataset,
        reference_split=args.reference_split, config=config, batch_size=args.batch_size,
        feature=args.feature, samples_per_group=args.samples, data_dir=args.data_dir,
        probe_epochs=args.probe_epochs, progress=not args.no_progress))
    print('\n'.join(interpret.summary_lines(results[-1])))
    print(f'figures      {", ".join(str(target / f) for f in results[-1]["figures"].values())}')
  if len(results) == 2:
    ious = [interpret.load_result(out / f'{i}-{pathlib.Path(r).name}')[1]
            for i, r in enumerate(args.models)]
    compared = interpret.comparison(results[0], results[1], *ious)
    report.write_json(compared, out / 'comparison.json')
    print('\n'.join(interpret.comparison_lines(compared)))
  return 0


def _cmd_demo(args: argparse.Namespace) -> int:
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import demo, models  # pylint: disable=import-outside-toplevel
  encoder = models.load_encoder(args.model, dtype=args.dtype)
  demo.run_demo(args.out, model=encoder, model_label=args.model, dataset=args.dataset, data_dir=args.data_dir,
                stage=None if args.stage == 'default' else args.stage, eps=args.eps,
                probe_epochs=args.probe_epochs, progress=not args.no_progress)
  return 0


def _add_dtype(command: argparse.ArgumentParser) -> None:
  command.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'],
                       help='computation dtype of the model (default auto: bfloat16 on TPU and '
                            'GPU, float32 on CPU); parameters, statistics and the '
                            'representations stay float32, and the store records it')


def build_parser() -> argparse.ArgumentParser:
  """The ``qscore`` argument parser: one subcommand per task, each with its handler.

  ``parse_args`` returns a namespace whose ``func(args)`` runs the command and
  returns the exit status (see :func:`main`).
  """
  parser = argparse.ArgumentParser(
      prog='qscore',
      description='Q-Score analysis of self-supervised image representations (JAX/Flax).')
  multihost = parser.add_argument_group(
      'multi-host (TPU pods, GPU clusters)',
      'Run the same command on every host; each process reads its share of the data and all '
      'processes compute one global result.')
  multihost.add_argument('--distributed', action='store_true',
                         help='call jax.distributed.initialize() before anything else (auto-'
                              'detects TPU pods, SLURM, Open MPI and GKE; elsewhere give the three '
                              'options below)')
  multihost.add_argument('--coordinator-address', metavar='HOST:PORT',
                         help='address of process 0 (default: auto-detected or '
                              '$JAX_COORDINATOR_ADDRESS)')
  multihost.add_argument('--num-processes', type=int, help='number of processes (default: '
                                                           'auto-detected)')
  multihost.add_argument('--process-id', type=int, help='this process\'s index, 0-based '
                                                        '(default: auto-detected)')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  demo = commands.add_parser(
      'demo', help='the whole method on built-in data in about a minute on 2 CPU cores; '
                   'writes a report',
      description='Loads the small SimCLR encoder shipped with the package, embeds the built-in '
                  'synthetic shapes, finds the discriminative features, scores Q, trains the '
                  'linear probe, reports AUPRC (correct = positive and error = positive) and the '
                  'compression curve, draws heatmaps, judges each claim of the paper on these '
                  'numbers (supported / not supported / inconclusive, with 95% intervals), and '
                  'writes OUT/report.md (Markdown with PNG plots) and OUT/report.json; prints '
                  'the verdicts and the path.')
  demo.add_argument('--out', default='qscore_demo',
                    help='output directory (default ./qscore_demo; a rerun reuses its stores)')
  demo.add_argument('--model', default='demo-simclr-r18w025',
                    help='encoder (default: the shipped demo-simclr-r18w025); any saved model '
                         'directory, finetune workdir or converted id')
  _add_dtype(demo)
  demo.add_argument('--dataset', default='synthetic_shapes/fixed_colours_small',
                    help='a dataset with core/spurious masks and train/test splits (default '
                         'synthetic_shapes/fixed_colours_small, generated on first use)')
  demo.add_argument('--stage', default='layer2',
                    help="Grad-CAM stage (default layer2, 8x8 on 32-px images; 'default': the "
                         "model's own default, layer4 for a ResNet)")
  demo.add_argument('--eps', type=float, default=2.0,
                    help="L_i threshold in standard deviations (default 2; the paper's 4 leaves "
                         'most images of the 128-d demo encoder with no highly active '
                         'discriminative feature)')
  demo.add_argument('--probe-epochs', type=int, default=100,
                    help='epochs of the linear probe (default 100)')
  demo.add_argument('--data-dir', help='tfds data directory (default $QSCORE_JAX_DATA_DIR or '
                                       '~/tensorflow_datasets)')
  demo.add_argument('--no-progress', action='store_true', help='no progress bars')
  demo.set_defaults(func=_cmd_demo)

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
                  'the official file (cached in $QSCORE_JAX_CACHE/downloads, default '
                  '~/.cache/qscore_jax/downloads, '
                  'verified against the registry digest when known), or the path of a local file '
                  '(positional or --file): its method and architecture are read from its layout '
                  '(--method only where several methods publish the same layout, e.g. a bare '
                  'ResNet backbone). Every parameter must be filled exactly once and every array '
                  'of the file used or dropped by an explicit rule; the parts that hold no array '
                  '(epoch, args, optimizer settings) are summarised in metadata.json.')
  convert.add_argument('model_id', nargs='?', help='registry id (qscore models), e.g. '
                       'dino-vits16, or the path of a local checkpoint')
  convert.add_argument('--file', help='local checkpoint: .pth/.pth.tar/.ckpt, TF1 prefix, '
                       '.index or .zip, or BYOL .pkl')
  convert.add_argument('--method', help='simclr, swav, moco, mocov3, byol, dino, simsiam, vicreg, '
                       'barlowtwins or solo-learn (default: the registry entry\'s, or the one '
                       'whose layout the file has; needed only when several methods fit)')
  convert.add_argument('--arch', help='architecture (e.g. resnet50, vit_small); inferred from '
                       'the file when omitted')
  convert.add_argument('--arch-option', action='append', type=_parse_option, metavar='KEY=VALUE',
                       help='architecture option the weights cannot reveal, e.g. num_heads=12 '
                       'or conv_padding=tf_same (repeatable)')
  convert.add_argument('--submodel', help='which network of the file: DINO teacher|student, BYOL '
                       'online|target, MoCo query|key, MoCo v3 base|momentum, SimCLR base|ema, '
                       'solo-learn base|momentum (default: the one the authors evaluate)')
  convert.add_argument('--out', help='output directory (default checkpoints/<model-id>, '
                       'plus -<submodel> for a non-default --submodel; without a registry id '
                       'checkpoints/<method>-<file name>)')
  convert.add_argument('--overwrite', action='store_true',
                       help='replace the model in --out (only one qscore_jax wrote), once the '
                            'new one is complete')
  convert.add_argument('--no-progress', action='store_true', help='no download progress bar')
  convert.set_defaults(func=_cmd_convert)

  datasets = commands.add_parser(
      'datasets', help='describe a dataset, or list how datasets are named',
      description='Without a name: the dataset naming scheme (built-in datasets, tfds names, '
                  'image folders) and every config of the built-in datasets. With a name: its '
                  'classes, splits and features (generated datasets are prepared on the way).')
  datasets.add_argument('name', nargs='?', help='e.g. synthetic_shapes, cifar10, folder:/path')
  datasets.add_argument('--data-dir', help='tfds data directory (default $QSCORE_JAX_DATA_DIR '
                        'or ~/tensorflow_datasets)')
  datasets.set_defaults(func=_cmd_datasets)

  prepare = commands.add_parser(
      'prepare', help='prepare a dataset (imagenet2012, imagenet100, salient_imagenet, ...)',
      description='Prepare a dataset in the tfds data directory: imagenet2012 from the manual '
                  'download in <data-dir>/downloads/manual, imagenet100 from a prepared '
                  'imagenet2012, salient_imagenet from the published Salient ImageNet folder, '
                  'the built-in generated datasets by generating them, downloadable tfds '
                  'datasets by downloading them; then describe it as `qscore datasets NAME` '
                  'does.')
  prepare.add_argument('name', help='dataset name')
  prepare.add_argument('--data-dir', help='tfds data directory (default '
                       '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  prepare.add_argument('--salient-dir', help='salient_imagenet: the published dataset folder')
  prepare.add_argument('--annotations', help='salient_imagenet: discover_spurious_features.csv')
  prepare.add_argument('--imagenet-train-dir', help='salient_imagenet: read images from an '
                       'ImageNet train folder (<wnid>/<name>.JPEG) instead of imagenet2012')
  prepare.set_defaults(func=_cmd_prepare)

  embed = commands.add_parser(
      'embed', help='embed a dataset split into a representation store (resumable)',
      description='Embed a split with a saved/converted model into a representation store '
                  '(float32 N x d, labels, ids, one shard per process). Run with the same '
                  'arguments again to resume an interrupted run. Multi-host: run on every host.')
  embed.add_argument('model', help='a saved model directory (qscore convert / save_model), a '
                     'finetune workdir, a converted registry id or a shipped model id')
  _add_dtype(embed)
  embed.add_argument('--dataset', required=True, help='dataset name (qscore datasets)')
  embed.add_argument('--split', required=True, help='split, e.g. train, test, validation')
  embed.add_argument('--out', required=True, help='store directory')
  embed.add_argument('--batch-size', type=int, default=256,
                     help='global batch, a multiple of the device count (default 256)')
  embed.add_argument('--image-size', type=int,
                     help="override the model's input size (default: its preprocessing's)")
  embed.add_argument('--data-dir', help='tfds data directory (default '
                     '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  embed.add_argument('--no-progress', action='store_true', help='no progress bar')
  embed.add_argument('--overwrite', action='store_true',
                     help='delete the store in --out (only one qscore_jax wrote) and embed '
                          'afresh, instead of resuming or reusing it')
  embed.set_defaults(func=_cmd_embed)

  analyze = commands.add_parser(
      'analyze', help='discriminative features, Q-Score, probe, AUPRC, compression, plots',
      description='Analyse a representation space from two stores (reference/train split and '
                  'evaluation split): A_j and D on the reference split, Q-Score and baselines on '
                  'the evaluation split, linear probe, how well Q tells the probe\'s correct '
                  'samples from its errors (AUPRC with correct = positive, the paper\'s view, '
                  'and with error = positive, ranked by -Q; AUROC; chance levels; 95% bootstrap '
                  'intervals), RankMe and alpha-ReQ, compression curve, and the paper\'s claims '
                  'judged on these numbers. Writes report.json, scores.npz and PNG plots.')
  analyze.add_argument('--train', required=True, help='store of the reference (training) split')
  analyze.add_argument('--eval', required=True, help='store of the evaluation split')
  analyze.add_argument('--out', required=True, help='output directory (new or empty)')
  analyze.add_argument('--overwrite', action='store_true',
                       help='replace the analysis in --out (only one qscore_jax wrote), once '
                            'the new one is complete')
  analyze.add_argument('--eps', type=float, default=4.0, help='L_i threshold in stds (default 4)')
  analyze.add_argument('--band', type=float, nargs=2, default=[50.0, 95.0],
                       metavar=('LO', 'HI'), help='percentiles of A_j for D (default 50 95)')
  analyze.add_argument('--all-features', action='store_true',
                       help='percentiles over all A_j instead of the non-zero ones')
  analyze.add_argument('--probe-epochs', type=int, default=100,
                       help='epochs of the linear probe (default 100)')
  analyze.add_argument('--probe-batch-size', type=int, default=256,
                       help='minibatch of the linear probes (default 256)')
  analyze.add_argument('--probe-lr', type=float, default=0.1,
                       help='initial SGD learning rate of the linear probes (default 0.1)')
  analyze.add_argument('--probe-feature-norm', default='standardize',
                       choices=['standardize', 'l2', 'none'],
                       help='feature normalisation before the probes (default standardize: '
                            "the reference split's mean and std)")
  analyze.add_argument('--knn-k', type=int, default=10,
                       help='neighbours of the k-NN agreement baseline (default 10)')
  analyze.add_argument('--bootstrap-resamples', type=int, default=1000,
                       help='resamples of the 95%% intervals of AUPRC/AUROC (default 1000; 0: '
                            'none, and every claim comes out inconclusive)')
  analyze.add_argument('--no-compression', action='store_true', help='skip the compression curve')
  analyze.add_argument('--compression-seeds', type=int, default=3,
                       help='random feature subsets per point of the compression curve, seeds '
                            '0..N-1 (default 3)')
  analyze.add_argument('--compression-probe-epochs', type=int, default=30,
                       help='epochs of each probe of the compression curve (default 30)')
  analyze.add_argument('--seed', type=int, default=0,
                       help='seed of the linear probes, main and compression (default 0)')
  analyze.add_argument('--data-dir', help='tfds data directory, for class names (default '
                       '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  analyze.set_defaults(func=_cmd_analyze)

  supervised = commands.add_parser(
      'train-supervised', help='train a backbone with labels from scratch (reference encoder)',
      description='Train a backbone plus linear classifier with cross-entropy on a fixed-size '
                  'dataset (e.g. synthetic_shapes) and save it like a converted model.')
  supervised.add_argument('--dataset', default='synthetic_shapes',
                          help='dataset whose train split is used (default synthetic_shapes)')
  supervised.add_argument('--arch', default='resnet18',
                          help='backbone architecture (default resnet18)')
  supervised.add_argument('--arch-option', action='append', type=_parse_option, metavar='KEY=VALUE',
                          help='architecture option, e.g. width_multiplier=0.25 (repeatable)')
  supervised.add_argument('--steps', type=int, default=1000,
                          help='training steps (default 1000)')
  supervised.add_argument('--batch-size', type=int, default=128,
                          help='global batch, a multiple of the device count (default 128)')
  supervised.add_argument('--lr', type=float, default=0.1,
                          help='peak learning rate of the warm-up + cosine schedule (SGD, '
                               'Nesterov momentum 0.9) (default 0.1)')
  supervised.add_argument('--seed', type=int, default=0,
                          help='seed of the initialisation, data order and augmentations '
                               '(default 0)')
  supervised.add_argument('--data-dir', help='tfds data directory (default '
                          '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  supervised.add_argument('--out', required=True,
                          help='directory of the saved model (classifier saved as a head)')
  supervised.add_argument('--overwrite', action='store_true',
                          help='replace the model in --out (only one qscore_jax wrote), once '
                               'the new one is complete')
  supervised.set_defaults(func=_cmd_train_supervised)

  finetune = commands.add_parser(
      'finetune', help='fine-tune (or pre-train) with an SSL method and the Q-Score regularizer',
      description='Train with a method\'s own SSL objective plus the Q-Score regularizer, '
                  'from a converted/saved model or from scratch (--init random). Killed and '
                  'run again with the same arguments, it resumes exactly. Config fields: '
                  'qscore_jax/configs/finetune.py.')
  finetune.add_argument('--config', default='finetune',
                        help='NAME[:k=v,...] (a module of qscore_jax/configs) or FILE.py[:arg]; '
                             'e.g. finetune:method=byol,dataset=synthetic_shapes (default '
                             'finetune)')
  finetune.add_argument('--set', action='append', metavar='KEY=VALUE',
                        help='override a config field (dotted, repeatable), e.g. '
                             'regularizer.lambda1=0')
  finetune.add_argument('--init', default='random',
                        help="'random' (from scratch), a saved model directory, a finetune "
                             'workdir, a converted registry id or a shipped model id (default '
                             'random)')
  finetune.add_argument('--workdir', required=True,
                        help='checkpoints, logs, final model/ (resumed when it exists)')
  finetune.add_argument('--dtype', choices=['auto', 'float32', 'bfloat16'],
                        help='computation dtype of the backbone (the config field dtype, '
                             'default auto: bfloat16 on TPU and GPU, float32 on CPU); '
                             'parameters, optimizer state and statistics stay float32')
  finetune.add_argument('--stop-after', type=int,
                        help='stop after this step (resume later with the same command)')
  finetune.set_defaults(func=_cmd_finetune)

  exp = commands.add_parser(
      'experiment', help="the paper's experiment offline: pre-train, fine-tune with and without "
                         'the Q-Score regularizer over seeds, compare',
      description='Pre-trains each method from scratch on the built-in synthetic data, '
                  'fine-tunes each checkpoint with and without the regularizer for several '
                  'seeds, embeds and probes every model, and prints mean and spread of linear '
                  'accuracy, AUPRC of Q, sparsity and compression. Rerun to resume. Config '
                  'fields: qscore_jax/configs/experiment.py.')
  exp.add_argument('--config', default='experiment',
                   help='NAME[:k=v,...] or FILE.py[:arg] (default experiment)')
  exp.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override a config field (repeatable), e.g. seeds=0:1')
  exp.add_argument('--workdir', required=True, help='every run, its evaluation, and results')
  exp.set_defaults(func=_cmd_experiment)

  study = commands.add_parser(
      'study', help='when does Q-Score find mistakes: every per-sample score against errors '
                    'of known source, on synthetic data (pre-trains its own encoders)',
      description='Pre-trains SimCLR and BYOL encoders on synthetic-shapes configurations whose '
                  'errors have a known source (weak evidence, a misleading background cue, '
                  'both), then reports for every per-sample score (Q-Score, Q v1, kNN '
                  'agreement, neighbourhood consistency, L2 norm, sparsity, max-softmax) its '
                  'AUPRC/AUROC for finding the probe\'s errors, by source, and its rank '
                  'correlation with the images\' difficulty, with bootstrap intervals. Rerun to '
                  'resume. Config fields: qscore_jax/configs/study.py.')
  study.add_argument('--config', default='study',
                     help='NAME[:k=v,...] or FILE.py[:arg] (default study)')
  study.add_argument('--set', action='append', metavar='KEY=VALUE',
                     help='override a config field (repeatable), e.g. pretrain_steps=400')
  study.add_argument('--workdir', required=True, help='every run, its evaluation, and results')
  study.set_defaults(func=_cmd_study)

  track = commands.add_parser(
      'track', help='label-free scores (RankMe, alpha-ReQ, LiDAR, mean Q) and linear accuracy '
                    'at every checkpoint of a run, and how well each ranks them',
      description='For step 0 and every checkpoint a qscore finetune / experiment / study run '
                  'saved: RankMe, alpha-ReQ, LiDAR, mean Q-Score, the size of D and the linear '
                  'probe\'s accuracy; then Kendall tau between each score and the accuracy, as '
                  'a table (track.md), JSON and a plot (track.png). Rerun to add new '
                  'checkpoints: finished steps are read back.')
  track.add_argument('workdir', help='the run\'s workdir (local)')
  track.add_argument('--out', help='output directory (default WORKDIR/track)')
  track.add_argument('--dataset', help="data to score (default: the run's training dataset)")
  track.add_argument('--split',
                     help='split that is scored and whose accuracy is reported (default test, '
                          'or validation for a dataset without a test split)')
  track.add_argument('--reference-split', default='train',
                     help='split giving D and training the probe (default train)')
  track.add_argument('--lidar-examples', type=int, default=512,
                     help='examples whose views enter LiDAR (default 512)')
  track.add_argument('--lidar-views', type=int, default=8,
                     help='augmented views of each (default 8)')
  track.add_argument('--batch-size', type=int, default=256,
                     help='global embedding batch, a multiple of the device count (default 256)')
  track.add_argument('--probe-epochs', type=int,
                     help='epochs of the linear probe (default: the analysis default, 100)')
  track.add_argument('--keep-stores', action='store_true',
                     help="keep every step's representation stores (default: deleted once the "
                          "step's row is written)")
  track.add_argument('--data-dir', help='tfds data directory (default '
                     '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  track.set_defaults(func=_cmd_track)

  compare = commands.add_parser(
      'compare', help='embed and probe several models on the same data, side by side',
      description='Embed the train and eval splits with each model (saved model directory, '
                  'finetune workdir, converted or shipped id), train the linear probe and print '
                  'linear accuracy and the AUPRC of Q (correct = positive and error = positive) '
                  'side by side.')
  compare.add_argument('models', nargs='+',
                       help='the models (usually two or more): saved model directory, finetune '
                            'workdir, converted registry id or shipped model id')
  _add_dtype(compare)
  compare.add_argument('--dataset', required=True, help='dataset name (qscore datasets)')
  compare.add_argument('--train-split', default='train',
                       help='split giving D and training the probe (default train)')
  compare.add_argument('--eval-split', default='test',
                       help='split that is scored and classified (default test)')
  compare.add_argument('--out', required=True,
                       help='directory for stores and reports (OUT/<i>-<model>/)')
  compare.add_argument('--batch-size', type=int, default=256,
                       help='global embedding batch, a multiple of the device count '
                            '(default 256)')
  compare.add_argument('--probe-epochs', type=int, default=100,
                       help='epochs of the linear probe (default 100)')
  compare.add_argument('--seed', type=int, default=0, help='seed of the linear probe (default 0)')
  compare.add_argument('--data-dir', help='tfds data directory (default '
                       '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  compare.add_argument('--no-progress', action='store_true', help='no progress bars')
  compare.set_defaults(func=_cmd_compare)

  interp = commands.add_parser(
      'interpret', help='heatmaps of discriminative features and their IoU with core / '
      'spurious masks',
      description='For each image of a dataset with masks (synthetic_shapes, salient_imagenet), '
                  'the Grad-CAM (or input-gradient) heatmap of the sum of its discriminative '
                  'activations, binarised and compared with the core and the spurious mask (IoU); '
                  'mean IoU over all, correctly classified and misclassified images, figures '
                  'of samples chosen by Q-Score and of one feature\'s top images. With two '
                  'models (e.g. before / after fine-tuning) also their paired difference.')
  interp.add_argument('models', nargs='+', metavar='MODEL',
                      help='saved model directory, finetune workdir, converted registry id or '
                           'shipped model id; two to compare')
  _add_dtype(interp)
  interp.add_argument('--dataset', default='synthetic_shapes',
                      help='dataset with core/spurious masks (default synthetic_shapes)')
  interp.add_argument('--split', default='test', help='split to explain (default test)')
  interp.add_argument('--reference-dataset', default=None,
                      help='dataset whose split gives D and trains the probe (default: '
                           '--dataset; e.g. imagenet2012 for salient_imagenet)')
  interp.add_argument('--reference-split', default='train',
                      help='split of the reference dataset (default train)')
  interp.add_argument('--out', required=True, help='output directory')
  interp.add_argument('--method', default='gradcam', choices=['gradcam', 'input_gradient'],
                      help='heatmap method: Grad-CAM at --stage, or input gradients (default '
                           'gradcam)')
  interp.add_argument('--stage', default=None,
                      help="Grad-CAM's feature map (default: layer4 of a ResNet; for a ViT the "
                           'tokens entering its last block)')
  interp.add_argument('--heatmap-threshold', type=float, default=0.6,
                      help='binarise heatmaps at this fraction of their max, or with '
                           '--threshold-mode top_fraction keep this fraction of the pixels '
                           '(default 0.6)')
  interp.add_argument('--threshold-mode', default='max_fraction',
                      choices=['max_fraction', 'top_fraction'],
                      help='max_fraction: pixels >= --heatmap-threshold x the max; '
                           'top_fraction: the top --heatmap-threshold fraction of pixels '
                           '(default max_fraction)')
  interp.add_argument('--mask-threshold', type=float, default=0.5,
                      help='a soft mask pixel >= this is inside (default 0.5)')
  interp.add_argument('--eps', type=float, default=4.0, help='L_i threshold (default 4)')
  interp.add_argument('--feature', type=int, default=None,
                      help='feature of the top-images figure (default: the discriminative '
                           'feature highly active most often)')
  interp.add_argument('--samples', type=int, default=4,
                      help='samples per group in the figure (default 4)')
  interp.add_argument('--batch-size', type=int, default=64,
                      help='global batch of the embedding and heatmap passes (default 64)')
  interp.add_argument('--probe-epochs', type=int, default=100,
                      help='epochs of the linear probe that labels samples correct / '
                           'misclassified (default 100)')
  interp.add_argument('--data-dir', help='tfds data directory (default '
                      '$QSCORE_JAX_DATA_DIR or ~/tensorflow_datasets)')
  interp.add_argument('--no-progress', action='store_true', help='no progress bars')
  interp.set_defaults(func=_cmd_interpret)

  inspect = commands.add_parser(
      'inspect', help='embed a generated batch with a model and print representation statistics',
      description='Build a backbone (random weights) from a registry id or architecture name, '
                  'or load a saved model directory or shipped model, embed a batch of generated '
                  'images with the jitted forward pass, and print throughput and the statistics '
                  'Q-Score is built on (per-sample mean/std, highly active features).')
  inspect.add_argument('model', help='registry id (e.g. dino-vits16), architecture '
                       '(e.g. resnet50), a directory written by save_model or a shipped '
                       'model id (demo-simclr-r18w025)')
  inspect.add_argument('--batch-size', type=int, default=8, help='images in the batch (default 8)')
  inspect.add_argument('--image-size', type=int, default=None,
                       help="square input side (default: the model's preprocessing size)")
  inspect.add_argument('--seed', type=int, default=0,
                       help='seed of images and random weights (default 0)')
  inspect.add_argument('--json', action='store_true', help='print the report as JSON')
  inspect.set_defaults(func=_cmd_inspect)
  return parser


def _initialize_distributed(args: argparse.Namespace) -> None:
  manual = (args.coordinator_address, args.num_processes, args.process_id)
  if not args.distributed:
    if any(value is not None for value in manual):
      raise ValueError('--coordinator-address, --num-processes and --process-id only apply with '
                       '--distributed.')
    return
  # Imported here, not at the top: `qscore --help` stays fast.
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)


# The arguments of each command that name a directory (or file) it reads, and one it
# writes, so that they may be URLs (gs://...): see qscore_jax.remote. Model references go
# through load_encoder, and `finetune --workdir` through finetune.loop.run (which pushes
# after every checkpoint); tfds data directories are read and written by TensorFlow itself.
REMOTE_INPUTS = {'analyze': ('train', 'eval'), 'convert': ('file',)}
REMOTE_OUTPUTS = {'demo': 'out', 'convert': 'out', 'embed': 'out', 'analyze': 'out',
                  'train-supervised': 'out', 'experiment': 'workdir', 'study': 'workdir',
                  'compare': 'out',
                  'interpret': 'out'}
# Outputs whose command works on the URL's local copy itself (finetune pushes after every
# checkpoint): only named in messages here.
REMOTE_SELF_SYNCED = {'finetune': 'workdir'}


@contextlib.contextmanager
def _local_paths(args: argparse.Namespace, copies: dict[str, str]) -> Iterator[None]:
  """Replaces the command's URL arguments by local copies while it runs (outputs are
  pushed back when it ends, whether it succeeded or not); records each copy in
  ``copies`` (local path -> URL) so that error messages can name the URL."""
  names = [*REMOTE_INPUTS.get(args.command, ()), REMOTE_OUTPUTS.get(args.command),
           REMOTE_SELF_SYNCED.get(args.command)]
  # A cheap look first: importing qscore_jax.remote imports the package (seconds).
  if not any('://' in str(getattr(args, name, None) or '') for name in names if name):
    yield
    return
  # Imported here, not at the top: `qscore --help` stays fast.
  from qscore_jax import remote  # pylint: disable=import-outside-toplevel
  synced = getattr(args, REMOTE_SELF_SYNCED.get(args.command, ''), None)
  if remote.is_url(synced):
    copies[str(remote.local_path(synced))] = str(synced)
  for name in REMOTE_INPUTS.get(args.command, ()):
    url = getattr(args, name)
    setattr(args, name, remote.local_input(url))
    if remote.is_url(url):
      copies[str(getattr(args, name))] = str(url)
  output = REMOTE_OUTPUTS.get(args.command)
  url = getattr(args, output, None) if output else None
  with remote.working_copy(url) as local:
    if output and local is not None:
      setattr(args, output, local)
      copies[str(local)] = str(url)
    yield


def _naming_urls(message: object, copies: dict[str, str]) -> str:
  """``message`` with each local copy's path replaced by the URL the user gave, longest
  path first (the tool's messages name the paths it works on, the user knows the URL)."""
  text = str(message)
  for local in sorted(copies, key=len, reverse=True):
    text = text.replace(local, copies[local])
  return text


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``qscore`` command line with ``argv`` (default ``sys.argv[1:]``).

  Args:
    argv: the arguments after the program name.

  Returns:
    The exit status: 0 on success, 1 for a failed training run, 2 for a bad input
    (its message goes to stderr).
  """
  args = build_parser().parse_args(argv)
  plain = warnings.formatwarning
  copies: dict[str, str] = {}
  # The tool's own warnings (a damaged checkpoint set aside, a stale lock taken over) read
  # as messages, not as a source line of the package.
  warnings.formatwarning = lambda message, category, *rest, **kw: (
      f'qscore {args.command}: warning: {_naming_urls(message, copies)}\n'
      if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning)
      else plain(message, category, *rest, **kw))
  try:
    _initialize_distributed(args)
    with _local_paths(args, copies):
      return args.func(args)
  except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as error:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f'qscore {args.command}: error: {_naming_urls(message, copies)}', file=sys.stderr)
    return 2
  finally:
    warnings.formatwarning = plain


if __name__ == '__main__':
  sys.exit(main())
