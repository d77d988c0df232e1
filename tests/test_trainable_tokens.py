"""Trainable token rows (PEFT's trainable_token_indices): the rows, their
count, merge, Hugging Face PEFT 0.21.2 (the peer) both ways on tiny Llamas
written by transformers' save_pretrained (tied and untied head, vocabulary
grown as resize_token_embeddings grows it), and runs through the config
system (new tokens in the tokenizer, exact resume, exports)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.methods import tokens as tokens_lib
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import finished
from lorajax.training import model_loading
from lorajax.training import tasks
from lorajax.training import train

import toy_models
from test_model_factory import make_config as factory_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

# The checkpoints' vocabulary, and after 2 new tokens (67, 68): every new
# row is trained, as in a run, so the base's draw of them does not matter.
V, GROWN = 67, 69
ROWS = (3, 41, 67, 68)   # two old tokens, two new ones
IDS = np.array([[1, 3, 68, 41, 66, 7, 67, 2, 9],
                [5, 67, 3, 3, 12, 68, 8, 41, 0]])
TARGETS = (['q_proj', 'v_proj'], r'.*/attn/(q_proj|v_proj)/kernel')
MEASURED = {}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  made = {}

  def get(tied):
    if tied not in made:
      torch.manual_seed(0)
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=48, vocab_size=V,
          initializer_range=0.2, tie_word_embeddings=tied))
      made[tied] = tmp_path_factory.mktemp(f'tied{tied}')
      model.save_pretrained(made[tied])
    return made[tied]
  return get


def _tables(model):
  """``{name: (path, vocabulary axis)}`` of a loaded model's tables."""
  if 'embeddings' in model.params:   # BERT
    return {'embed': ('embeddings/word_embeddings/embedding', 0)}
  out = {'embed': ('embed/embedding', 0)}
  if 'lm_head' in model.params:
    out['head'] = ('lm_head/kernel', 1)
  return out


def _grown(model, size=GROWN):
  """``model`` (``lorajax.models.load``) with the vocabulary grown, as a
  run with new tokens grows it (``tokens.grow``)."""
  params = model.params
  for i, (path, axis) in enumerate(_tables(model).values()):
    table = jnp.asarray(tokens_lib.grow(lorajax.spec.get_by_path(
        params, path), size, jax.random.key(i), axis))
    params = tokens_lib.replace_path(params, path.split('/'),
                                     lambda _, t=table: t)
  cfg = model.config.replace(vocab_size=size)
  return dataclasses.replace(model, params=params, config=cfg,
                             module=type(model.module)(cfg))


def _rows(model, indices=ROWS):
  return tokens_lib.TrainableTokens.of({
      name: tokens_lib.TokenTable(path, indices, axis)
      for name, (path, axis) in _tables(model).items()})


def _trained(rows, params, seed=3):
  values = rows.init(params)
  return {k: v + np.random.default_rng(seed).normal(0, 0.5, v.shape
                                                    ).astype(np.float32)
          for k, v in values.items()}


def _ours(model, spec, adapters, params):
  fn = jax.jit(lorajax.lora(model.apply, spec))
  return np.asarray(fn(params, adapters, jnp.asarray(IDS)))


def _torch_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _torch_base(directory, size=GROWN):
  model = transformers.LlamaForCausalLM.from_pretrained(
      directory, attn_implementation='eager').eval()
  if size != V:
    model.resize_token_embeddings(size)
  return model


def _close(what, got, want, tol=1e-4):
  delta = float(np.abs(got - want).max())
  MEASURED[what] = delta
  print(f'{what}: max |dlogit| {delta:.2e}')
  assert delta <= tol, what
  return delta


def _lora(model, seed=2):
  spec = LoraSpec([(TARGETS[1], lorajax.Lora(rank=2, alpha=4.0)),
                   ('.*', 'freeze')])
  adapters = toy_models.perturb(
      lorajax.init(spec, model.params, jax.random.key(1)), seed=seed)
  return spec, adapters


# ---- the rows ---------------------------------------------------------------


def test_only_the_rows_train_and_merge_equals_written():
  """Under jit: the gradient reaches the [n, d] values only, rows not
  chosen keep the base's values, and merge gives the written logits."""
  table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  head = np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32)
  params = {'embed': {'embedding': jnp.asarray(table)},
            'lm_head': {'kernel': jnp.asarray(head)}}
  rows = tokens_lib.TrainableTokens.of({
      'embed': tokens_lib.TokenTable('embed/embedding', (7, 2)),
      'head': tokens_lib.TokenTable('lm_head/kernel', (7, 2), 1)})
  values = rows.init(params)
  np.testing.assert_array_equal(values['embed'], table[[7, 2]])
  np.testing.assert_array_equal(values['head'], head[:, [7, 2]].T)

  def loss(v, p, ids):
    q = rows.apply(p, v)
    h = q['embed']['embedding'][ids]
    return jnp.sum(jax.nn.log_softmax(h @ q['lm_head']['kernel']) ** 2)

  ids = jnp.array([1, 2, 7, 9])
  grads = jax.jit(jax.grad(loss))(values, params, ids)
  assert {k: g.shape for k, g in grads.items()} == {'embed': (2, 4),
                                                    'head': (2, 4)}
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())
  moved = {k: v + 1.0 for k, v in values.items()}
  merged = rows.merge(params, moved)
  other = np.setdiff1d(np.arange(10), [7, 2])
  np.testing.assert_array_equal(np.asarray(merged['embed']['embedding'])[
      other], table[other])
  np.testing.assert_array_equal(np.asarray(merged['lm_head']['kernel'])[
      :, [7, 2]], moved['head'].T)
  assert params['embed']['embedding'] is not merged['embed']['embedding']
  assert float(loss(moved, params, ids)) == pytest.approx(
      float(loss(rows.init(merged), merged, ids)), abs=1e-5)


@pytest.mark.parametrize('indices,match', [
    ((3, 10), r'index 10 is out of range; the table has 10 rows'),
    ((-1,), r'index -1 is out of range'),
    ((4, 4), r'index 4 is listed twice'),
    ((), r'no token index'),
    ((2.0,), r'2.0 is not an integer'),
])
def test_bad_indices_are_refused(indices, match):
  params = {'embed': {'embedding': np.zeros((10, 3))}}
  rows = tokens_lib.TrainableTokens.of(
      {'embed': tokens_lib.TokenTable('embed/embedding', indices)})
  with pytest.raises(ValueError, match=match):
    rows.init(params)


def test_a_missing_or_quantized_table_is_refused():
  params = {'embed': {'embedding': np.zeros((10, 3))}}
  rows = tokens_lib.TrainableTokens.of(
      {'head': tokens_lib.TokenTable('lm_head/kernel', (1,), 1)})
  with pytest.raises(ValueError, match="'lm_head/kernel' is not a parameter"):
    rows.init(params)
  quantized = lorajax.quantize_params(
      {'embed': {'embedding': jnp.ones((64, 64))}},
      LoraSpec([('.*', lorajax.Quantized('int8'))]))
  rows = tokens_lib.TrainableTokens.of(
      {'embed': tokens_lib.TokenTable('embed/embedding', (1,))})
  with pytest.raises(ValueError, match='stored quantized'):
    rows.init(quantized)


def test_new_rows_are_drawn_as_transformers_draws_them():
  """Mean of the old rows plus noise of 1e-9 x their covariance."""
  table = np.random.default_rng(0).normal(2.0, 1.0, (50, 8)).astype(
      np.float32)
  grown = tokens_lib.grow(table, 53, jax.random.key(0))
  assert grown.shape == (53, 8)
  np.testing.assert_array_equal(grown[:50], table)
  assert np.abs(grown[50:] - table.mean(0)).max() < 1e-3
  assert np.abs(grown[50] - grown[51]).max() > 0
  np.testing.assert_array_equal(
      grown, tokens_lib.grow(table, 53, jax.random.key(0)))
  head = tokens_lib.grow(table.T, 53, jax.random.key(0), axis=1)
  np.testing.assert_array_equal(head, grown.T)


def test_report_counts_the_rows_not_the_table(checkpoints):
  model = _grown(lorajax.models.load(checkpoints(False)))
  spec, adapters = _lora(model)
  rows = _rows(model)
  values = rows.init(model.params)
  report = lorajax.trainable_report(spec, model.params, adapters,
                                    tokens=values)
  n_rows = 2 * len(ROWS) * 32   # embed and untied head, n x d each
  assert n_rows == 256 and GROWN * 32 == 2208
  n_train = lorajax.count(adapters) + n_rows
  assert report.startswith(f'trainable params: {n_train:,d} || all params: '
                           f'{lorajax.count(model.params) + n_train:,d}')
  assert 'trainable token rows: 256 values (embed (4, 32), head (4, 32))' in (
      report)


# ---- lorajax -> PEFT -> lorajax ---------------------------------------------


@pytest.mark.parametrize('with_lora', [True, False], ids=['lora', 'alone'])
@pytest.mark.parametrize('tied', [True, False], ids=['tied', 'untied'])
def test_export_loads_in_peft(checkpoints, tmp_path, tied, with_lora):
  """PeftModel.from_pretrained on the base resized by
  resize_token_embeddings gives lorajax's logits; the directory reads
  back; merging the rows gives the same logits."""
  directory = checkpoints(tied)
  model = _grown(lorajax.models.load(directory))
  rows = _rows(model)
  values = _trained(rows, model.params)
  if with_lora:
    spec, adapters = _lora(model)
  else:
    spec, adapters = LoraSpec([('.*', 'freeze')]), {}
  ours = _ours(model, spec, adapters, rows.apply(model.params, values))
  merged = _ours(model, spec, adapters, rows.merge(
      jax.device_get(model.params), values))
  name = f'{"tied" if tied else "untied"} {"lora" if with_lora else "alone"}'
  _close(f'{name} merged vs written', merged, ours, 1e-5)
  base = _torch_logits(_torch_base(directory))
  assert np.abs(ours - base).max() > 1e-2
  peft_export.export_peft(tmp_path, model.config, spec, adapters,
                          model.params, source=directory,
                          tokens=(rows, values))
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  if with_lora:
    assert cfg['trainable_token_indices'] == (
        list(ROWS) if tied else {'embed_tokens': list(ROWS),
                                 'lm_head': list(ROWS)})
  else:
    assert (cfg['peft_type'], cfg['token_indices']) == (
        'TRAINABLE_TOKENS', list(ROWS))
  pm = peft.PeftModel.from_pretrained(_torch_base(directory), tmp_path).eval()
  _close(f'{name} lorajax->PEFT', ours, _torch_logits(pm))
  back = peft_format.import_peft(tmp_path, model.config, model.params,
                                 source=directory)
  again = _ours(model, back.spec, back.adapters,
                back.params_for(model.params))
  _close(f'{name} round trip', again, ours, 1e-5)


# ---- PEFT -> lorajax --------------------------------------------------------


@pytest.mark.parametrize('tied,kind', [
    (True, 'list'), (True, 'alone'), (False, 'list'), (False, 'dict'),
    (False, 'alone')])
def test_peft_adapter_imports(checkpoints, tmp_path, tied, kind):
  """A PEFT-made adapter with non-zero token values (and LoRA factors)
  imports and gives PEFT's logits. PEFT saves the resized embedding
  layers whole beside them: they are imported as modules saved whole."""
  directory = checkpoints(tied)
  indices = list(ROWS)
  field = ({'embed_tokens': indices, 'lm_head': indices} if kind == 'dict'
           else indices)
  torch.manual_seed(0)
  cfg = (peft.TrainableTokensConfig(
      token_indices=indices,
      target_modules=None if tied else ['embed_tokens', 'lm_head'])
         if kind == 'alone' else peft.LoraConfig(
             r=2, lora_alpha=5, target_modules=TARGETS[0],
             trainable_token_indices=field))
  pm = peft.get_peft_model(_torch_base(directory), cfg)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'trainable_tokens_delta' in n or 'lora_B' in n:
        p.add_(torch.randn_like(p) * 0.5)
  pm.save_pretrained(tmp_path)
  theirs = _torch_logits(pm.eval())
  model = _grown(lorajax.models.load(directory))
  imported = peft_format.import_peft(tmp_path, model.config, model.params,
                                     source=directory)
  ours = _ours(model, imported.spec, imported.adapters,
               imported.params_for(model.params))
  base = _torch_logits(_torch_base(directory))
  assert np.abs(theirs - base).max() > 1e-2
  _close(f'{"tied" if tied else "untied"} {kind} PEFT->lorajax', ours,
         theirs)
  names = {n for n, _ in imported.tokens[0].tables}
  assert names == ({'embed', 'head'} if kind == 'dict' or (
      kind == 'alone' and not tied) else {'embed'})


def test_import_refuses_what_the_model_cannot_hold(checkpoints, tmp_path):
  """A tied model whose head would get other rows than its embedding;
  token ids beyond the model's vocabulary; a config that disagrees with
  the tensors."""
  directory = checkpoints(True)
  model = _grown(lorajax.models.load(directory))
  pm = peft.get_peft_model(_torch_base(directory), peft.LoraConfig(
      r=2, target_modules=TARGETS[0],
      trainable_token_indices={'embed_tokens': [3, 67], 'lm_head': [5]}))
  pm.save_pretrained(tmp_path / 'split')
  with pytest.raises(peft_format.PeftFormatError,
                     match=r"head 'lm_head' is tied.*rows \[5\]"):
    peft_format.import_peft(tmp_path / 'split', model.config, model.params,
                            source=directory)
  pm = peft.get_peft_model(_torch_base(directory), peft.LoraConfig(
      r=2, target_modules=TARGETS[0], trainable_token_indices=[3, 68]))
  pm.save_pretrained(tmp_path / 'grown')
  small = lorajax.models.load(directory)   # not grown: 67 rows
  with pytest.raises(peft_format.PeftFormatError,
                     match='token index 68 is out of range; the table has 67'):
    peft_format.import_peft(tmp_path / 'grown', small.config, small.params,
                            source=directory)
  path = tmp_path / 'grown' / 'adapter_config.json'
  cfg = json.loads(path.read_text())
  cfg['trainable_token_indices'] = [3, 41, 68]
  path.write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError,
                     match=r'shape \(2, 32\); \[3, d\] expected'):
    peft_format.import_peft(tmp_path / 'grown', model.config, model.params,
                            source=directory)


def test_export_refuses_what_peft_cannot_say(checkpoints, tmp_path):
  """Token rows next to LoHa (its config has no trainable_token_indices),
  token rows alone with a module trained whole (TRAINABLE_TOKENS has no
  modules_to_save), and an MoE decoder; nothing is written."""
  directory = checkpoints(False)
  model = _grown(lorajax.models.load(directory))
  rows = _rows(model)
  tokens = (rows, rows.init(model.params))
  spec = LoraSpec([(TARGETS[1], lorajax.LoHa(rank=2)), ('.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(0))
  with pytest.raises(peft_format.PeftFormatError,
                     match="LOHA config has no trainable_token_indices"):
    peft_export.export_peft(tmp_path / 'a', model.config, spec, adapters,
                            model.params, source=directory, tokens=tokens)
  spec = LoraSpec([('final_norm/.*', 'train'), ('.*', 'freeze')])
  with pytest.raises(peft_format.PeftFormatError,
                     match="no modules_to_save for \\['model.norm'\\]"):
    peft_export.export_peft(tmp_path / 'b', model.config, spec, {},
                            model.params, source=directory, tokens=tokens)
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
  from lorajax.io import peft_tokens  # pylint: disable=g-import-not-at-top
  from lorajax.models import moe  # pylint: disable=g-import-not-at-top
  with pytest.raises(peft_format.PeftFormatError, match='MoE decoder'):
    peft_tokens.check_exportable(moe.MoeConfig.tiny(), 'LORA')


def test_bert_classifier_rows_both_ways(tmp_path):
  """A BERT sequence classifier with two new tokens (its head saved whole,
  as PEFT's SEQ_CLS saves it): lorajax -> PEFT and a PEFT-made adapter ->
  lorajax."""
  torch.manual_seed(0)
  directory = tmp_path / 'bert'
  transformers.BertForSequenceClassification(transformers.BertConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, vocab_size=V, max_position_embeddings=40,
      initializer_range=0.3, num_labels=3)).save_pretrained(directory)

  def peer():
    model = transformers.BertForSequenceClassification.from_pretrained(
        directory, attn_implementation='eager').eval()
    model.resize_token_embeddings(GROWN)
    return model

  model = _grown(lorajax.models.load(directory))
  rows = _rows(model)
  values = _trained(rows, model.params)
  spec = LoraSpec([(r'.*/attention/(query|value)/kernel',
                    lorajax.Lora(rank=2, alpha=4.0)), ('.*', 'freeze')])
  adapters = toy_models.perturb(
      lorajax.init(spec, model.params, jax.random.key(1)), seed=2)
  ours = _ours(model, spec, adapters, rows.apply(model.params, values))
  peft_export.export_peft(tmp_path / 'out', model.config, spec, adapters,
                          model.params, source=directory,
                          tokens=(rows, values))
  cfg = json.loads((tmp_path / 'out' / 'adapter_config.json').read_text())
  assert cfg['trainable_token_indices'] == list(ROWS)
  pm = peft.PeftModel.from_pretrained(peer(), tmp_path / 'out').eval()
  _close('bert lorajax->PEFT', ours, _torch_logits(pm))
  pm = peft.get_peft_model(peer(), peft.LoraConfig(
      task_type='SEQ_CLS', r=2, lora_alpha=5, target_modules=['query',
                                                              'value'],
      trainable_token_indices=list(ROWS)))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'trainable_tokens_delta' in n or 'lora_B' in n:
        p.add_(torch.randn_like(p) * 0.5)
  pm.save_pretrained(tmp_path / 'made')
  imported = peft_format.import_peft(tmp_path / 'made', model.config,
                                     model.params, source=directory)
  _close('bert PEFT->lorajax', _ours(
      model, imported.spec, imported.adapters,
      imported.params_for(model.params)), _torch_logits(pm.eval()))


def test_the_serving_registry_refuses_token_rows(checkpoints):
  """Registered adapters share one base: token rows are not served."""
  from lorajax.serving import registry  # pylint: disable=g-import-not-at-top
  model = _grown(lorajax.models.load(checkpoints(True)))
  rows = _rows(model)
  spec, adapters = _lora(model)
  bundle = peft_format.PeftAdapter(spec, adapters, {}, {},
                                   (rows, rows.init(model.params)))
  served = registry.AdapterRegistry(model.apply, model.params)
  with pytest.raises(ValueError, match="adapter 'x' trains token rows"):
    served.add_bundle('x', bundle)


# ---- the config system ------------------------------------------------------

NEW = '<|turn|>,<|end|>'
TEMPLATE = ("{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|turn|>"
            "assistant\n{% endif %}")


@pytest.fixture(scope='module')
def qwen2_dir(tmp_path_factory):
  """A tiny random Qwen2ForCausalLM (tied) with SmolLM2's tokenizer."""
  return toy_models.tiny_qwen2_dir(tmp_path_factory.mktemp('qwen2'))


def _sft_config(qwen2_dir, **fields):
  return toy_models.load_config(
      'rt_smollm2_sft', num_train_steps=2, eval_every=2, checkpoint_every=1,
      **{'model.path': str(qwen2_dir), 'new_tokens': NEW,
         'trainable_tokens': '5', 'sft.template': TEMPLATE,
         'eval_at_start': False, **fields})


def test_sft_run_with_new_tokens_trains_saves_resumes_and_exports(
    qwen2_dir, tmp_path):
  """Chat fine-tuning whose template writes two new tokens: the tokenizer
  encodes them whole, only their rows (and token 5's) train next to LoRA,
  checkpoints hold the [3, 32] rows and no table, a resumed run ends with
  the same rows, and the peft and merged exports give the run's logits in
  PEFT / transformers."""
  from lorajax.data import chat  # pylint: disable=g-import-not-at-top
  config = _sft_config(qwen2_dir)
  model = model_loading.load_model(config)
  vocab = 49152
  assert model.config.vocab_size == vocab + 2
  new_ids = [model.tokenizer.token_to_id(t) for t in NEW.split(',')]
  assert new_ids == [vocab, vocab + 1]
  ids, _ = chat.encode_chat(model.tokenizer, chat.ChatTemplate(TEMPLATE), [
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant',
                                          'content': 'yo'}])
  assert ids.tolist().count(vocab) == 2 and ids.tolist().count(vocab + 1) == 2
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(config, str(workdir))
  task = tasks.build_task(config, splits=())
  n_lora = lorajax.count(task.adapters)
  assert summary['trainable_params'] == n_lora + 3 * 32
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  assert meta['shapes']['tokens/embed'] == [[3, 32], 'float32']
  assert not [p for p, (s, _) in meta['shapes'].items() if vocab + 2 in s]
  # Adam's two moments and the rows: no [V, d] table anywhere.
  sizes = {item: ckpt_lib.item_size(str(workdir / 'checkpoints'), 2, item)
           for item in ('trainable', 'opt')}
  print(f'checkpoint bytes: {sizes}; one [V, d] table: {(vocab + 2) * 128}')
  assert max(sizes.values()) < (vocab + 2) * 32 * 4 / 10
  trainable, frozen = task.split_params()

  def final(folder):
    out, _ = ckpt_lib.restore_trainable(
        folder / 'checkpoints', ckpt_lib.abstract(trainable),
        ckpt_lib.read_meta(folder / 'checkpoints')[1], 2)
    return jax.device_get(out)

  done = final(workdir)
  start = trainable['tokens']['embed']
  assert (np.abs(done['tokens']['embed'] - start).max(1) > 0).all()
  # Resume from step 1: the same rows and adapters at step 2.
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / '2')
  for name in ('summary.json', 'metrics.jsonl'):
    os.remove(again / name)
  assert train.train_and_evaluate(config, str(again))['resumed_from'] == 1
  for a, b in zip(jax.tree.leaves(final(again)), jax.tree.leaves(done)):
    np.testing.assert_array_equal(a, b)
  # The run's own logits: rows written into the frozen base, LoRA on top.
  ids = jnp.asarray([[1, vocab, 5, 300, vocab + 1, 7, 5, vocab]])
  fn = jax.jit(lorajax.lora(
      lambda p, x: task.model.module.apply({'params': p}, x), task.spec))
  written = task.method.token_rows.apply(frozen, done['tokens'])
  ours = np.asarray(fn(lorajax.combine(done['params'], written),
                       done['adapters'], ids))
  with pytest.raises(ValueError, match="format 'lorajax' has no place for "
                     'the trainable token rows'):
    finished.export_checkpoint(config, str(workdir), str(tmp_path / 'x'))
  out = finished.export_checkpoint(config, str(workdir), str(tmp_path / 'peft'),
                                   'peft')
  cfg = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert cfg['trainable_token_indices'] == [5, vocab, vocab + 1]
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / 'peft' / 'tokenizer.json'))
  assert len(tok) == vocab + 2
  assert tok.convert_tokens_to_ids(['<|end|>']) == [vocab + 1]
  base = transformers.Qwen2ForCausalLM.from_pretrained(
      qwen2_dir, attn_implementation='eager').eval()
  base.resize_token_embeddings(len(tok))   # as the README says
  pm = peft.PeftModel.from_pretrained(base, out).eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
  _close('sft run lorajax->PEFT (Qwen2, tied)', ours, theirs)
  merged = finished.export_checkpoint(config, str(workdir),
                                      str(tmp_path / 'merged'), 'merged')
  hf = transformers.Qwen2ForCausalLM.from_pretrained(
      merged, attn_implementation='eager').eval()
  assert hf.config.vocab_size == vocab + 2
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
  _close('sft run merged (Qwen2, tied)', ours, theirs)
  assert (tmp_path / 'merged' / 'tokenizer.json').exists()


def test_rows_alone_with_method_head(qwen2_dir):
  """method='head' with token rows and no train_rules: the trainable tree
  is the [3, 32] rows, and the task's jitted loss sends gradient to each."""
  config = _sft_config(qwen2_dir, method='head')
  task = tasks.build_task(config, splits=())
  trainable, frozen = task.split_params()
  assert lorajax.count(trainable) == 3 * 32
  ids = np.array([[1, 49152, 5, 300, 49153, 7, 5, 49152]], np.int32)
  batch = {'inputs': ids, 'targets': np.roll(ids, -1, 1),
           'mask': np.ones_like(ids), 'segment_ids': np.ones_like(ids),
           'positions': np.arange(8, dtype=np.int32)[None]}
  grads = jax.jit(jax.grad(lambda t: task.loss_fn(
      t, frozen, batch, jax.random.key(0))[0]))(trainable)
  assert lorajax.count(grads) == 3 * 32
  assert (np.abs(np.asarray(grads['tokens']['embed'])).max(1) > 0).all()


@pytest.mark.parametrize('fields,match', [
    ({'trainable_tokens': '5,5'}, r'config.trainable_tokens.*5 is listed '
     'twice'),
    ({'trainable_tokens': '49153'}, r'index 49153 is out of range; the table '
     'has 49153 rows'),
    ({'trainable_tokens': 'x'}, r"config.trainable_tokens='x': 'x' is not a "
     'token id'),
    ({'trainable_tokens': '49152'}, r'index 49152 is listed twice'),
    ({'new_tokens': '<|im_end|>'}, r"'<\|im_end\|>' is already in the "
     r'vocabulary as id 2'),
    ({'new_tokens': '<a>,<a>'}, r"config.new_tokens: '<a>' is listed twice"),
    ({'method': 'prefix'}, r"method 'prefix' does not run trainable token "
     'rows'),
    ({'method': 'full'}, r"rows of 'embed/embedding', which rule 0 '.\*' -> "
     "'train' also trains"),
])
def test_config_refusals(qwen2_dir, fields, match):
  config = _sft_config(qwen2_dir, **{'new_tokens': '<x>', **fields})
  with pytest.raises(ValueError, match=match):
    tasks.build_task(config, splits=())


def test_a_factory_model_is_refused():
  with pytest.raises(ValueError, match='config.trainable_tokens needs a model '
                     'whose word embedding lorajax knows'):
    tasks.build_task(factory_config(trainable_tokens='1'), splits=())


def test_zz_print_measured():
  for what, delta in sorted(MEASURED.items()):
    print(f'{what}: {delta:.2e}')
