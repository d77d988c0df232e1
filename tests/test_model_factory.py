"""config.model.factory: your own Flax model trains, resumes, sweeps and
exports its adapter; a factory that returns the wrong thing is refused."""

import json
import os
import signal
import textwrap

import jax
from ml_collections import config_dict
import numpy as np
import pytest

import lorajax
from lorajax import io as io_lib
from lorajax.sweeps import grid
from lorajax.sweeps import runner
from lorajax.training import attach
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import finished
from lorajax.training import metrics as metrics_lib
from lorajax.training import model_loading
from lorajax.training import saved_run
from lorajax.training import signals
from lorajax.training import tasks
from lorajax.training import train
from lorajax.training import validate

FACTORY = 'toy_factory:make_classifier'
TARGETS = r'encoder/block_\d/(up|down)/kernel'


def make_config(factory=FACTORY, task='classification', **fields):
  """The shrunk classification run on ``factory``, LoRA on its Dense
  kernels and the head trained."""
  c = config_lib.base_config(task)
  config_lib.shrink(c)
  c.model.factory = factory
  c.model.factory_kwargs = config_dict.ConfigDict({'width': 16})
  c.lora.targets = TARGETS
  c.lora.rank = 4
  c.train_rules = r'classifier/.*'
  c.optim.learning_rate = 1e-2
  for key, value in fields.items():
    node, *parts = c, *key.split('.')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  c.lock()
  return c


def losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {step: row['loss'] for step, row in rows.items()}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run: config, summary, workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = make_config()
  return config, train.train_and_evaluate(config, workdir), workdir


def test_trains_lora_on_your_dense_kernels(reference):
  config, summary, workdir = reference
  assert summary['model_factory'] == FACTORY
  # Rank 4 on up [16, 32] and down [32, 16] of 2 blocks, and the head.
  assert summary['trainable_params'] == 2 * 2 * (16 + 32) * 4 + 16 * 2 + 2
  rows = losses(workdir)
  assert list(rows) == list(range(1, config.num_train_steps + 1))
  assert rows[config.num_train_steps] < rows[1]   # lr 1e-2 on 96 rows
  _, meta = saved_run.read_meta(workdir)
  assert meta['model']['factory'] == FACTORY
  assert meta['model']['factory_kwargs'] == {'width': 16}
  trained = sorted(meta['shapes'])
  assert 'adapters/encoder/block_1/down/kernel/a' in trained
  assert not any('embed' in p for p in trained)


def test_stopped_run_resumes_exactly(reference, tmp_path, monkeypatch):
  config, _, ref_dir = reference
  write = metrics_lib.MetricWriter.write

  def stop_after_3(self, step, split, scalars):
    write(self, step, split, scalars)
    if split == 'train' and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', stop_after_3)
  with pytest.raises(signals.RunStopped):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', write)
  assert max(losses(str(tmp_path))) == 3
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['resumed_from'] == 3
  assert losses(str(tmp_path)) == losses(ref_dir)   # exact, step by step
  trainable, _ = tasks.build_task(config, splits=()).split_params()
  got, want = (jax.device_get(ckpt_lib.restore_trainable(
      os.path.join(d, 'checkpoints'), trainable,
      saved_run.read_meta(d)[1], config.num_train_steps)[0])
               for d in (str(tmp_path), ref_dir))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_another_factory(reference, tmp_path):
  config, _, ref_dir = reference
  other = make_config('toy_factory:make_classifier_apply',
                      allow_config_change=True)
  # Same trainable shapes, another model: the model description differs.
  with pytest.raises(ValueError, match="another model.*factory="
                     "'toy_factory:make_classifier'.*make_classifier_apply"):
    train.train_and_evaluate(other, ref_dir)
  # A kwarg is part of the model too, whatever allow_config_change says.
  meta = saved_run.read_meta(ref_dir)[1]
  narrow = model_loading.load_model(
      make_config(**{'model.factory_kwargs.width': 8}), ('0', '1'))
  with pytest.raises(ValueError, match=r"factory_kwargs=\{'width': 16\} "
                     r"\(this run: \{'width': 8\}\)"):
    ckpt_lib.check_compatible(meta, dict(meta, model=narrow.info), ref_dir)
  del config, tmp_path


def test_exports_the_lorajax_adapter_and_refuses_peft(reference, tmp_path):
  config, _, workdir = reference
  saved = saved_run.run_config(workdir)   # what cli/export reads
  assert saved.model.factory == FACTORY
  out = finished.export_checkpoint(saved, workdir, str(tmp_path / 'adapter'))
  model = model_loading.load_model(config, ('0', '1'))
  bundle = io_lib.load_adapter(out, model.params)   # checks the base too
  trainable, frozen = tasks.build_task(config, splits=()).split_params()
  restored, _ = ckpt_lib.restore_trainable(
      os.path.join(workdir, 'checkpoints'), trainable,
      saved_run.read_meta(workdir)[1], config.num_train_steps)
  restored = jax.device_get(restored)
  # The file's adapters and head on the user's own apply give the run's
  # logits, through the low-rank path and merged into the kernels.
  batch = {k: np.ones((2, 8), np.int32) for k in
           ('input_ids', 'attention_mask', 'token_type_ids')}
  batch['input_ids'][1, :4] = [101, 2307, 3185, 102]
  run_fn = jax.jit(lorajax.lora(model.apply, bundle.spec))
  want = run_fn(lorajax.combine(restored['params'], frozen),
                restored['adapters'], batch)
  params = bundle.params_for(model.params)
  np.testing.assert_allclose(run_fn(params, bundle.adapters, batch), want,
                             atol=1e-6)
  merged = lorajax.merge(params, bundle.adapters, bundle.spec)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(merged, batch), want, atol=1e-5)
  assert not np.allclose(apply(model.params, batch), want, atol=1e-3)
  for fmt in ('peft', 'merged'):
    with pytest.raises(ValueError, match=f"format '{fmt}'.*model.factory="
                       f"'{FACTORY}'.*--format lorajax"):
      finished.export_checkpoint(saved, workdir, str(tmp_path / fmt), fmt)
    assert not (tmp_path / fmt).exists()


def test_a_sweep_of_two_runs(tmp_path):
  config_file = tmp_path / 'my_config.py'
  config_file.write_text(textwrap.dedent(f'''
      from ml_collections import config_dict
      from lorajax.training import config as config_lib

      def get_config(arg=None):
        c = config_lib.base_config('classification')
        config_lib.shrink(c)
        c.num_train_steps = 2
        c.model.factory = {FACTORY!r}
        c.model.factory_kwargs = config_dict.ConfigDict({{'width': 16}})
        c.lora.targets = {TARGETS!r}
        c.lock()
        return c

      def sweep(add):
        for width in (8, 16):
          add(**{{'model.factory_kwargs.width': width}})
      '''))
  sweep_dir = str(tmp_path / 'sweep')
  runs = grid.expand(str(config_file), sweep_dir)
  assert [r.name for r in runs] == ['model.factory_kwargs.width=8',
                                    'model.factory_kwargs.width=16']
  assert '--config.model.factory_kwargs.width=8' in runs[0].command()

  def in_process(run):   # the subprocess launcher's work, without exec
    train.train_and_evaluate(run.config, run.workdir)
    return 0
  outcome = runner.run_sweep(runs, sweep_dir, launcher=in_process,
                             echo=lambda s: None)
  assert outcome == {r.name: 'done' for r in runs}
  counts = []
  for run in runs:
    with open(os.path.join(run.workdir, runner.SUMMARY)) as f:
      summary = json.load(f)
    assert summary['model_factory'] == FACTORY
    counts.append(summary['trainable_params'])
  # LoRA rank 8 on up/down of two blocks, and a 2-way head, per width.
  assert counts == [2 * 2 * (w + 2 * w) * 8 + w * 2 + 2 for w in (8, 16)]


def test_apply_factory_with_dropout():
  model = model_loading.load_model(
      make_config('toy_factory:make_classifier_apply'), ('a', 'b', 'c'))
  batch = {k: np.ones((2, 8), np.int32) for k in
           ('input_ids', 'attention_mask', 'token_type_ids')}
  apply = jax.jit(model.apply, static_argnames='train')
  assert apply(model.params, batch, train=False, rng=None).shape == (2, 3)
  a, b = (apply(model.params, batch, train=True, rng=jax.random.key(s))
          for s in (0, 1))
  assert not np.allclose(a, b)   # dropout sees the key


def test_a_tiny_lm_with_its_own_tokenizer_trains():
  config = make_config('toy_factory:make_lm', task='lm',
                       **{'lora.targets': r'mix/kernel', 'train_rules': '',
                          'model.factory_kwargs.width': 8})
  task = tasks.build_task(config, splits=('validation',))
  batch = {k: v[:4] for k, v in task.data['validation'].items()}
  # Bytes of the text, each document ended by the factory's eos_id 256.
  assert batch['inputs'].shape == (4, 32) and batch['inputs'].max() <= 256
  trainable, frozen = task.split_params()
  grad = jax.jit(jax.grad(lambda t: task.loss_fn(
      t, frozen, batch, jax.random.key(0))[0]))(trainable)
  assert float(np.abs(grad['adapters']['mix']['kernel']['b']).max()) > 0
  stats = jax.jit(task.eval_fn)(trainable, frozen, batch)
  # A random 257-way head starts near uniform: loss ~ log 257.
  assert abs(stats['loss_sum'] / stats['count'] - np.log(257)) < 0.5


# ---- refusals -------------------------------------------------------------


@pytest.mark.parametrize('factory,message', [
    ('toy_factory', r"expected 'pkg.module:function'"),
    ('no_such_module:make', r"module 'no_such_module' does not import"),
    ('toy_factory:missing', r"toy_factory has no attribute 'missing'"),
    ('toy_factory:NOT_CALLABLE', r'NOT_CALLABLE is a int, not a function'),
    ('toy_factory:wrong_logits', r'logits have shape \(2, 5\).*\(2, 2\)'),
    ('toy_factory:no_params', r'params are NoneType'),
    ('toy_factory:variables_dict', r"variables dict \{'params': ...\}"),
])
def test_bad_factories_are_refused_before_training(factory, message,
                                                   tmp_path):
  config = make_config(factory)
  with pytest.raises(ValueError, match=message) as err:
    if factory == 'toy_factory':   # caught with every other config field
      train.train_and_evaluate(config, str(tmp_path))
    else:
      model_loading.load_model(config, ('0', '1'))
  assert f'model.factory={factory!r}' in str(err.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_unexpected_factory_kwargs_name_them():
  config = make_config(**{'model.factory_kwargs.height': 3})
  with pytest.raises(ValueError, match=r"model.factory='toy_factory:make_"
                     r"classifier': calling it .*\['height', 'width'\].*"
                     'height'):
    model_loading.load_model(config)


def test_lm_logits_narrower_than_the_tokenizer_are_refused():
  config = make_config('toy_factory:lm_too_few_logits', task='lm',
                       **{'lora.targets': r'mix/kernel', 'train_rules': ''})
  with pytest.raises(ValueError, match=r"lm_too_few_logits'.*V=100.*257"):
    model_loading.load_model(config)


@pytest.mark.parametrize('field,value,message', [
    ('method', 'prompt', r"config.method='prompt'.*model.factory="),
    ('method', 'bottleneck', r"config.method='bottleneck'"),
    ('model.path', '/some/checkpoint', r"model.factory=.*when model.path"),
    ('model.dtype', 'bfloat16', r"model.dtype='bfloat16'.*model.factory"),
])
def test_methods_that_need_a_shipped_model_are_refused(field, value,
                                                       message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.check_config(make_config(**{field: value}))


def test_sft_is_refused():
  c = config_lib.base_config('sft')
  c.model.factory = FACTORY
  with pytest.raises(validate.ConfigError, match=r"config.task='sft'"):
    validate.check_config(c)


def test_hugging_face_target_names_need_a_regex():
  config = make_config(**{'lora.targets': 'all-linear'})
  model = model_loading.load_model(config, ('0', '1'))
  with pytest.raises(ValueError, match="lora.targets='all-linear' needs a "
                     'Hugging Face family.*give a regex'):
    attach.attach_method(config, model)
