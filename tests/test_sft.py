"""Chat SFT: assistant-only masks, packed == unpacked loss through the task,
and the shipped config's smoke run."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from lorajax.data import chat
from lorajax.training import input_pipeline
from lorajax.training import sft
from lorajax.training import tasks
from lorajax.training import train

from toy_models import load_config
from toy_models import tiny_qwen2_dir

ROWS = [
    {'text': 'A gorgeous, witty film.', 'label': 1},
    {'text': 'Dull and far too long; I left early.', 'label': 0},
    {'prompt': 'Summarize: the cat sat.', 'completion': 'A cat sat down.'},
    {'messages': [
        {'role': 'system', 'content': 'Answer briefly.'},
        {'role': 'user', 'content': 'What is 2+2?'},
        {'role': 'assistant', 'content': 'Four.'},
        {'role': 'user', 'content': 'And 3+3?'},
        {'role': 'assistant', 'content': 'Six.'}]},
] * 3


@pytest.fixture(scope='module')
def tiny_task():
  config = load_config('rt_smollm2_sft')
  return config, tasks.build_task(config, splits=())


def answers(row, config):
  return [m['content'] for m in sft.conversations(config, [row])[0]
          if m['role'] == 'assistant']


@pytest.mark.parametrize('packed', [True, False])
def test_trained_tokens_are_the_assistant_tokens(tiny_task, packed):
  config, task = tiny_task
  with config.unlocked():
    config.sft.packing = packed
  arrays = sft.encode_rows(config, task.model, ROWS, train=True)
  tok = task.model.tokenizer
  # Each reply: its own tokens and its <|im_end|>.
  want = sum(len(tok.encode(a, add_special_tokens=False).ids) + 1
             for r in ROWS for a in answers(r, config))
  assert int(arrays['mask'].sum()) == want
  trained = arrays['targets'][arrays['mask'] > 0]
  assert tok.decode(trained.tolist(), skip_special_tokens=False).count(
      '<|im_end|>') == sum(len(answers(r, config)) for r in ROWS)
  with config.unlocked():
    config.sft.assistant_only = False
  everything = sft.encode_rows(config, task.model, ROWS, train=True)
  assert everything['mask'].sum() == (everything['segment_ids'] > 0).sum()
  with config.unlocked():
    config.sft.assistant_only, config.sft.packing = True, True


def test_packed_loss_equals_unpacked_loss(tiny_task):
  config, task = tiny_task
  trainable, frozen = task.split_params()
  # Non-zero adapters so that LoRA takes part in the comparison.
  trainable = jax.tree.map(lambda x: x + 0.05, trainable)
  packed = sft.encode_rows(config, task.model, ROWS, train=True)
  with config.unlocked():
    config.sft.packing = False
  padded = sft.encode_rows(config, task.model, ROWS, train=True)
  with config.unlocked():
    config.sft.packing = True
  assert len(packed['inputs']) < len(padded['inputs'])
  key = jax.random.key(0)
  loss_p, stats_p = task.loss_fn(trainable, frozen, packed, key)
  loss_u, stats_u = task.loss_fn(trainable, frozen, padded, key)
  assert float(stats_p['count']) == float(stats_u['count'])
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5,
                             atol=1e-5)


def test_exact_match_counts_rows_whose_answer_is_the_argmax(tiny_task):
  config, task = tiny_task
  trainable, frozen = task.split_params()
  rows = sft.encode_rows(config, task.model, ROWS[:2], train=False)
  stats = task.eval_fn(trainable, frozen, rows)
  assert float(stats['examples']) == 2.0
  # Make the targets the model's own argmax: every row is then exact.
  logits = task.model.module.apply({'params': task.params}, rows['inputs'],
                                   segment_ids=rows['segment_ids'])
  rows = dict(rows, targets=np.asarray(logits.argmax(-1), np.int32))
  stats = task.eval_fn(trainable, frozen, rows)
  assert float(stats['exact']) == 2.0
  assert tasks.summarize(stats)['accuracy'] == 1.0


def test_greedy_generation_uses_the_chat_template(tiny_task):
  config, task = tiny_task
  module = task.model.module

  def apply(p, *args, **kw):
    return module.apply({'params': p}, *args, **kw)
  out = sft.generate_answers(config, task.model, apply, task.params,
                             ROWS[:3], max_new_tokens=2, batch_size=2)
  assert len(out) == 3 and all(isinstance(a, str) for a in out)


def test_smoke_config_trains_and_scores_exact_match(tmp_path):
  config = load_config('rt_smollm2_sft')
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['metric'] == 'accuracy'
  assert 0.0 <= summary['test']['accuracy'] <= 1.0
  assert summary['initial_validation'] is not None
  assert summary['tokens_per_sec'] > 0


def test_template_override_and_missing_template(tiny_task):
  config, task = tiny_task
  with config.unlocked():
    config.sft.template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
  try:
    assert sft.chat_template(config, task.model).render(
        [{'role': 'user', 'content': 'x'}]) == 'x|'
  finally:
    with config.unlocked():
      config.sft.template = ''
  bare = dataclasses.replace(task.model, chat_template=None)
  with pytest.raises(ValueError, match='ships no chat template'):
    sft.chat_template(config, bare)
  assert isinstance(sft.chat_template(config, task.model), chat.ChatTemplate)


# A Qwen2-style template (default system prompt, whitespace control, attribute
# access), written here for the test.
QWEN_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role != 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope='module')
def qwen2_chat_dir(tmp_path_factory):
  """A tiny random Qwen2ForCausalLM whose tokenizer has its own template."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  return tiny_qwen2_dir(tmp_path_factory.mktemp('qwen2_chat'),
                        tokenizer_class='PreTrainedTokenizerFast',
                        chat_template=QWEN_STYLE)


def test_a_checkpoint_directory_brings_its_own_template(qwen2_chat_dir,
                                                        tmp_path):
  transformers = pytest.importorskip('transformers')
  config = load_config('rt_smollm2_sft', **{'model.path': str(qwen2_chat_dir)})
  task = tasks.build_task(config, splits=())
  rows = sft.encode_rows(config, task.model, ROWS[:4], train=False)
  # The folder's tokenizer.json as it is (AutoTokenizer would take
  # Qwen2Tokenizer from config.json's model_type, whose own pre-tokenizer
  # regex is not this SmolLM2 file's).
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(
      str(qwen2_chat_dir))
  for i, messages in enumerate(sft.conversations(config, ROWS[:4])):
    out = hf.apply_chat_template(messages, tokenize=True)
    want = list(out['input_ids'] if hasattr(out, 'keys') else out)
    n = int((rows['segment_ids'][i] > 0).sum())
    got = rows['inputs'][i, :n].tolist() + [int(rows['targets'][i, n - 1])]
    assert got == want
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary['test']['accuracy'] <= 1.0


def _chat_file(path, n=40, bad=()):
  """A JSONL file of conversations: messages rows and prompt/completion
  rows, with ``bad`` rows (line index -> row) in between."""
  rows = []
  for i in range(n):
    if i % 2:
      rows.append({'messages': [
          {'role': 'user', 'content': f'Is {i} even?'},
          {'role': 'assistant', 'content': 'no' if i % 2 else 'yes'},
          {'role': 'user', 'content': 'Sure?'},
          {'role': 'assistant', 'content': 'yes'}]})
    else:
      rows.append({'prompt': f'Is {i} even?', 'completion': 'yes'})
  for line, row in bad:
    rows.insert(line, row)
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(path)


def _file_config(path, **overrides):
  return load_config('rt_smollm2_sft', **{
      'data.path': path, 'data.validation_fraction': 0.2,
      'data.test_fraction': 0.2, 'data.train_split': 'train',
      'data.validation_split': 'validation', 'data.test_split': 'test',
      **overrides})


def test_conversations_from_a_file_train(tmp_path):
  config = _file_config(_chat_file(tmp_path / 'chat.jsonl'))
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(summary['test']['loss'])


@pytest.mark.parametrize('row,problem', [
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, 'no assistant'),
    ({'messages': [{'role': 'user'}, {'role': 'assistant', 'content': 'x'}]},
     'message 0 .user. has no text content'),
    ({'prompt': 'hi'}, "missing field 'completion'"),
    ({'text': 'plain'}, 'needs messages, or prompt and completion'),
])
def test_bad_conversation_rows_name_file_and_line(tmp_path, row, problem):
  path = _chat_file(tmp_path / 'chat.jsonl', bad=[(3, row)])
  with pytest.raises(ValueError, match=rf'chat.jsonl:4: .*{problem}'):
    input_pipeline.load_split(_file_config(path), None, 'train')
