"""config.model.path: LoRA trains a Hugging Face checkpoint directory."""


import numpy as np
import pytest

from lorajax.training import metrics as metrics_lib
from lorajax.training import model_loading
from lorajax.training import train

from toy_models import load_config
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
