"""config.model.path: LoRA trains a Hugging Face checkpoint directory."""


import dataclasses

import jax
import numpy as np
import pytest

import lorajax
from lorajax.data import loader
from lorajax.methods import adalora_allocator
from lorajax.training import metrics as metrics_lib
from lorajax.training import model_loading
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import step as step_lib
from lorajax.training import tasks
from lorajax.training import train
from lorajax.training import validate

from toy_models import load_config
from toy_models import tiny_distilbert_dir
from toy_models import tiny_qwen2_dir

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def qwen2_dir(tmp_path_factory):
  """A tiny random Qwen2ForCausalLM with SmolLM2's tokenizer beside it."""
  return tiny_qwen2_dir(tmp_path_factory.mktemp('qwen2'))


def test_lora_trains_a_qwen2_directory(qwen2_dir, tmp_path):
  config = load_config('shakespeare_smollm2_lora',
                       **{'model.path': str(qwen2_dir)})
  summary = train.train_and_evaluate(config, str(tmp_path))
  rows = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert list(rows) == list(range(1, config.num_train_steps + 1))
  assert all(np.isfinite(r['loss']) for r in rows.values())
  assert np.isfinite(summary['final_validation']['perplexity'])
  # Rank-8 adapters on q and v of 2 layers: (32 + 32) * 8 + (32 + 16) * 8.
  assert summary['trainable_params'] == 2 * (64 * 8 + 48 * 8)
  model = model_loading.load_model(config)
  assert model.name == 'qwen2' and model.module.config.qkv_bias
  assert model.info['architecture'] == 'Qwen2ForCausalLM'
  assert model.eos_id == 2 and model.chat_template


def test_an_encoder_path_is_refused_for_the_lm(tmp_path):
  transformers.BertModel(transformers.BertConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=37, vocab_size=99)).save_pretrained(tmp_path)
  config = load_config('shakespeare_smollm2_lora',
                       **{'model.path': str(tmp_path)})
  with pytest.raises(ValueError, match='model.path=.*task lm.*bert encoder'):
    model_loading.load_model(config)
  config = load_config('shakespeare_smollm2_lora', attn_chunk=64,
                       **{'model.path': str(tmp_path)})
  with pytest.raises(ValueError, match='model.path=.*task lm.*bert encoder'):
    model_loading.load_model(config)


def test_attn_chunk_reaches_a_decoder_directory(qwen2_dir):
  config = load_config('shakespeare_smollm2_lora', attn_chunk=64,
                       **{'model.path': str(qwen2_dir)})
  model = model_loading.load_model(config)
  assert model.config.attn_chunk == 64
  assert model.module.config.attn_chunk == 64


def test_lora_trains_a_distilbert_classifier_directory(tmp_path):
  """An encoder family other than the shipped BERT, through the config
  system: the checkpoint's own classifier, LoRA on its q/v kernels."""
  (tmp_path / 'model').mkdir()
  tiny_distilbert_dir(tmp_path / 'model')
  config = load_config('rt_minilm_lora',
                       **{'model.path': str(tmp_path / 'model')})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = metrics_lib.read_jsonl(str(tmp_path / 'run' / 'metrics.jsonl'))
  assert list(rows) == list(range(1, config.num_train_steps + 1))
  assert all(np.isfinite(r['loss']) for r in rows.values())
  # Rank-8 LoRA on q and v of 2 layers, (32 + 32) * 8 each, plus the whole
  # classifier: pre_classifier 32 * 32 + 32 and the output 32 * 2 + 2.
  assert summary['trainable_params'] == 4 * 64 * 8 + 1056 + 66
  model = model_loading.load_model(config, labels=('neg', 'pos'))
  assert model.name == 'distilbert'
  assert model.info['architecture'] == 'DistilBertForSequenceClassification'


@pytest.mark.parametrize('family', ['qwen2', 'distilbert'])
def test_every_method_trains_a_checkpoint_directory(family, qwen2_dir,
                                                    tmp_path):
  """Every config.method on a non-shipped decoder and encoder: one train
  step each, as a run takes it (``_first_step``), a finite loss, and the
  trainable count each method implies. Whole runs on these directories,
  with evaluation, checkpoints and export: the tests above and
  test_family_roundtrip."""
  from lorajax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  if family == 'qwen2':
    name, path = 'shakespeare_smollm2_lora', qwen2_dir
  else:
    name, path = 'rt_minilm_lora', tmp_path / 'model'
    path.mkdir()
    tiny_distilbert_dir(path)
  counts = {}
  for method in config_lib.METHODS:
    if method == 'head' and family == 'qwen2':
      continue  # An LM has no separate head to train alone.
    config = load_config(name, **{'model.path': str(path), 'method': method})
    loss, counts[method] = _first_step(config)
    assert np.isfinite(loss), method
  assert counts['lora'] == counts['qlora'] < counts['loha']  # 2 pairs each.
  assert counts['ia3'] < counts['lora'] < counts['dora'] < counts['full']
  if family == 'qwen2':
    # IA3 scales k (16), v (16) and the MLP's down input (64) in 2 layers.
    assert counts['ia3'] == 2 * (16 + 16 + 64)


def _first_step(config):
  """The loss of a run's first train step and its trainable count: the
  task, optimizer (with AdaLoRA's hooks), runner and state that
  ``train.train_and_evaluate`` builds, without its evaluations and
  checkpoints."""
  validate.check_config(config)
  task = tasks.build_task(config, splits=('train',))
  trainable, frozen = task.split_params()
  tx, _ = optim.from_config(config.optim, int(config.num_train_steps))
  loss_fn, tx = adalora_allocator.training_hooks(
      task.spec, task.params, task.loss_fn, tx)
  task = dataclasses.replace(task, loss_fn=loss_fn)
  runner = parallel.runner_from_config(config, task, tx)
  state, frozen = runner.place(
      step_lib.create_state(trainable, tx, config.seed), frozen)
  batch = next(iter(loader.BatchIterator(
      task.data['train'], batch_size=config.batch_size, seed=config.seed,
      train=True)))
  _, metrics = runner.train_step(state, frozen, runner.put_batch(batch))
  return float(jax.device_get(metrics['loss'])), lorajax.count(trainable)
