"""A few LoRA training steps of a tiny BERT under jit, pmap and a mesh.

Run by ``tests/test_parallel.py`` in a fresh process, so that the CPU device
count (and the distributed runtime) is set before JAX starts::

  python tests/parallel_worker.py --out r.json --devices 8 --modes jit,pmap,mesh
  python tests/parallel_worker.py --out r0.json --devices 4 --modes mesh \
      --process 0 --processes 2 --port 12345

Writes JSON: for each mode the per-step losses, the validation stats, the
final trainable leaves (by path) and, on a mesh, the shardings (one spec per
leaf, padded to its rank) of the frozen kernels, adapters and Adam moments.
"""

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 4
BATCH = 16
TARGETS = r'encoder/layer_\d+/(attention/(query|value)|output)/kernel'


def _spec(x):
  spec = tuple(x.sharding.spec)
  return list(spec + (None,) * (x.ndim - len(spec)))


def _setup():
  """Model, spec, loss and data: identical in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import lorajax  # pylint: disable=g-import-not-at-top
  from lorajax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from lorajax.models import bert  # pylint: disable=g-import-not-at-top
  from lorajax.training import optim  # pylint: disable=g-import-not-at-top
  from lorajax.training import tasks  # pylint: disable=g-import-not-at-top

  cfg = bert.BertConfig(vocab_size=128, hidden_size=32, num_layers=1,
                        num_heads=4, intermediate_size=64, max_position=32,
                        num_labels=2, hidden_dropout=0.0,
                        attention_dropout=0.0, pooling='mean')
  module = bert.Bert(cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          np.ones((1, 8), np.int32))['params']
  rng = np.random.default_rng(0)

  def fill(path, x):  # NumPy values: no XLA compile for the init.
    name = spec_lib.path_str(path)
    if name.endswith('scale'):
      return np.ones(x.shape, np.float32)
    if name.endswith('bias'):
      return np.zeros(x.shape, np.float32)
    return (0.2 * rng.standard_normal(x.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  spec = lorajax.LoraSpec([(TARGETS, lorajax.Lora(rank=4, alpha=8)),
                           (r'classifier/.*', lorajax.TRAIN),
                           (r'.*', lorajax.FREEZE)])
  adapters = jax.jit(lambda key: lorajax.init(spec, params, key))(
      jax.random.key(1))
  train, frozen = lorajax.partition(params, spec)
  apply_fn = lorajax.lora(tasks.classifier_apply(module, 'mean'), spec)
  n, length = 4 * BATCH, 12
  lengths = rng.integers(4, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  data = {'input_ids': rng.integers(1, 128, (n, length)).astype(np.int32)
                       * mask,
          'attention_mask': mask,
          'token_type_ids': np.zeros((n, length), np.int32),
          'label': rng.integers(0, 2, n).astype(np.int32)}
  tx, _ = optim.make_optimizer(learning_rate=1e-2, num_steps=STEPS,
                               warmup_steps=1, weight_decay=0.01,
                               clip_norm=1.0)
  return dict(
      spec=spec, trainable={'adapters': adapters, 'params': train},
      frozen=frozen, data=data, tx=tx,
      loss_fn=functools.partial(tasks.classification_loss, apply_fn=apply_fn),
      eval_fn=functools.partial(tasks.classification_eval, apply_fn=apply_fn))


def run(mode, setup, model):
  """Trains ``STEPS`` steps; returns losses, eval stats, leaves, shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lorajax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from lorajax.data import loader  # pylint: disable=g-import-not-at-top
  from lorajax.training import parallel  # pylint: disable=g-import-not-at-top
  from lorajax.training import sharding  # pylint: disable=g-import-not-at-top
  from lorajax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  kwargs = dict(loss_fn=setup['loss_fn'], eval_fn=setup['eval_fn'],
                tx=setup['tx'])
  if mode == 'mesh':
    kwargs.update(spec=setup['spec'], trainable=setup['trainable'],
                  frozen=setup['frozen'],
                  mesh=sharding.make_mesh(model=model))
  runner = parallel.make_runner(mode, **kwargs)
  state = step_lib.create_state(setup['trainable'], setup['tx'], seed=0)
  state, frozen = runner.place(state, setup['frozen'])
  shard = dict(process_index=jax.process_index(),
               process_count=jax.process_count())
  it = loader.BatchIterator(setup['data'], batch_size=BATCH, seed=0, **shard)
  losses = []
  for _ in range(STEPS):
    state, metrics = runner.train_step(state, frozen,
                                       runner.put_batch(next(it)))
    losses.append(float(metrics['loss']))
  total = None
  for batch in loader.BatchIterator(setup['data'], batch_size=BATCH,
                                    train=False, pad_last=True, **shard):
    stats = runner.eval_step(state.trainable, frozen,
                             runner.put_batch(batch))
    total = step_lib.sum_stats(total, stats)
  host = runner.to_host(runner.to_checkpoint(state))
  out = {'loss': losses, 'eval': total,
         'trainable': {p: np.asarray(x).tolist()
                       for p, x in spec_lib.flatten_paths(host.trainable)}}
  if mode == 'mesh':
    mu = state.opt_state[1][0].mu
    out['specs'] = {
        'kernel': {p: _spec(x) for p, x in spec_lib.flatten_paths(frozen)},
        'trainable': {p: _spec(x) for p, x in
                      spec_lib.flatten_paths(state.trainable)},
        'mu': {p: _spec(x) for p, x in spec_lib.flatten_paths(mu)}}
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--modes', default='jit,pmap,mesh')
  parser.add_argument('--model', type=int, default=2)
  parser.add_argument('--process', type=int, default=0)
  parser.add_argument('--processes', type=int, default=1)
  parser.add_argument('--port', type=int, default=0)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  if args.processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{args.port}',
                               num_processes=args.processes,
                               process_id=args.process,
                               initialization_timeout=60)
  setup = _setup()
  result = {'devices': jax.device_count(),
            'processes': jax.process_count()}
  for mode in args.modes.split(','):
    result[mode] = run(mode, setup, args.model)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(result, f)
  if args.processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
