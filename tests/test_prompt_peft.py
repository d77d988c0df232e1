"""P-tuning, and prompt/prefix/P-tuning in PEFT's format, against the peer.

The peer is PEFT 0.21.2 on tiny random transformers models written with
``save_pretrained`` into tmp_path (``LlamaForCausalLM``,
``BertForSequenceClassification``), run in float64; lorajax runs in float32
and must give PEFT's logits to 1e-4 of their scale. Where PEFT computes
something lorajax cannot (the classifier's pooled position, the positions
after a prefix) the tests check that the difference is real and that the
export and import refuse it.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorajax.io import peft_prompts
from lorajax.methods import prompts as prompts_lib
from lorajax.methods import ptuning
import lorajax.models
from lorajax.training import attach
from lorajax.training import finished
from lorajax.training import train

import toy_models

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

TOL = 1e-4
N = 3
IDS = np.array([[5, 17, 42, 8, 9, 3], [7, 1, 2, 3, 0, 0]], np.int32)
MASK = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], np.int32)  # right-padded


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp('llama')
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
      max_position_embeddings=64)).save_pretrained(directory)
  return directory


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp('bert')
  transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=64, num_labels=3)).save_pretrained(directory)
  return directory


def _peer(directory, cls):
  return cls.from_pretrained(directory).double().eval()


def _peer_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(IDS, dtype=torch.long),
                 attention_mask=torch.tensor(MASK)).logits.numpy()


def _ours(loaded, **inputs):
  return np.asarray(loaded.apply(loaded.params, jnp.asarray(IDS),
                                 jnp.asarray(MASK), **inputs))


def _delta(got, want):
  """max |Δ| over real tokens (PEFT's LM logits include the virtual ones)."""
  if want.ndim == 3:
    want = want[:, -IDS.shape[1]:]
    got, want = got * MASK[..., None], want * MASK[..., None]
  return float(np.abs(got - want).max()), float(np.abs(want).max())


def _assert_close(got, want):
  delta, scale = _delta(got, want)
  assert delta <= TOL * scale, (delta, scale)
  return delta


def _peft_made(directory, cls, config, out, seed=1):
  """get_peft_model + perturbed prompt encoder + save_pretrained; returns
  PEFT's logits."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(_peer(directory, cls), config)
  with torch.no_grad():
    for p in model.prompt_encoder.parameters():
      p.add_(0.5 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out)
  return _peer_logits(model)


def _llama_tree(loaded, kind, key=jax.random.key(3)):
  hidden = loaded.config.hidden_size
  if kind == 'prompt':
    return {'prompt': 0.5 * jax.random.normal(key, (N, hidden))}
  tree = ptuning.init_encoder(key, N, hidden, encoder_hidden=16)
  tree['embedding'] = 0.5 * jax.random.normal(key, (N, hidden))
  return {'prompt_encoder': tree}


# ---- P-tuning ----------------------------------------------------------------


def test_ptuning_trains_and_its_encoder_gets_gradients(llama_dir):
  loaded = lorajax.models.load(llama_dir)
  tree = {'prompt_encoder': ptuning.init_encoder(
      jax.random.key(0), N, 32, encoder_hidden=16,
      embedding=loaded.params['embed']['embedding'])}
  ids = jnp.asarray(IDS[:1])

  def loss_fn(prompts):
    logits = loaded.apply(loaded.params, ids,
                          **prompts_lib.model_inputs(prompts))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], ids[:, 1:]).mean()

  opt = optax.adam(1e-2)
  state = opt.init(tree)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  losses = []
  for step in range(8):
    loss, grads = grad_fn(tree)
    if step == 0:
      for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, path  # every encoder leaf
    updates, state = opt.update(grads, state)
    tree = optax.apply_updates(tree, updates)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses


def test_folded_ptuning_gives_the_unfolded_logits(llama_dir):
  loaded = lorajax.models.load(llama_dir)
  tree = _llama_tree(loaded, 'ptuning')
  folded = prompts_lib.fold(tree)
  assert set(folded) == {'prompt'} and folded['prompt'].shape == (N, 32)
  unfolded = _ours(loaded, **prompts_lib.model_inputs(tree))
  np.testing.assert_allclose(_ours(loaded, **prompts_lib.model_inputs(folded)),
                             unfolded, atol=1e-6, rtol=0)


def test_ptuning_runs_from_a_config(tmp_path):
  """A classifier run with the LSTM encoder (the MLP one runs below)."""
  config = toy_models.load_config(
      'rt_minilm_lora', method='ptuning', num_train_steps=2, eval_every=2,
      checkpoint_every=2, **{'ptuning.num_tokens': 3,
                             'ptuning.encoder_hidden': 8,
                             'ptuning.encoder': 'lstm',
                             'ptuning.lstm_layers': 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['method'] == 'ptuning' and np.isfinite(summary['test']['loss'])
  with np.load(summary['prompts_file']) as folded:   # encoder folded away
    assert folded.files == ['prompt']
    assert folded['prompt'].shape[0] == 3
    assert summary['prompts_params'] == folded['prompt'].size
  # A classifier's prompt: PEFT would pool virtual token 0 (tested below).
  with pytest.raises(ValueError, match='trains virtual tokens.*pools the'):
    finished.export_checkpoint(config, str(tmp_path), str(tmp_path / 'peft'),
                               'peft')
  assert not (tmp_path / 'peft').exists()


def test_unknown_encoder_is_refused_by_name():
  config = toy_models.load_config('rt_minilm_lora', method='ptuning',
                                  **{'ptuning.encoder': 'GRU'})
  with pytest.raises(ValueError, match=r"ptuning.encoder='GRU'; expected "):
    attach.init_prompts(config, model=None)   # before the model is read


@pytest.mark.parametrize('encoder', ['MLP', 'LSTM'])
def test_encoder_computes_peft_prompt_encoder(encoder):
  """lorajax's encoder on a PEFT PromptEncoder's weights gives its output
  (LSTM: 2 bidirectional layers); every leaf gets a gradient."""
  from peft.tuners.p_tuning import model as p_tuning  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  peer_config = peft.PromptEncoderConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=5, token_dim=12,
      num_transformer_submodules=1, encoder_hidden_size=6,
      encoder_reparameterization_type=encoder)
  peer = p_tuning.PromptEncoder(peer_config).double().eval()
  with torch.no_grad():
    want = peer(torch.arange(5)[None])[0].numpy()
  tree = ptuning.from_peft_state(
      {k: v.numpy() for k, v in peer.state_dict().items()})
  assert set(tree) == ({'embedding', 'mlp', 'lstm'} if encoder == 'LSTM'
                       else {'embedding', 'mlp'})
  np.testing.assert_allclose(ptuning.encode(tree), want, atol=1e-6, rtol=0)
  described = ptuning.describe(tree)   # what an export records
  assert described == {k: getattr(peer_config, k) for k in described}
  grads = jax.grad(lambda t: jnp.sum(jnp.sin(ptuning.encode(t))))(tree)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, path
  fresh = ptuning.init_encoder(jax.random.key(0), 5, 12, encoder_hidden=6,
                               encoder=encoder)
  assert (jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, tree))


# ---- PEFT format: the supported cases -----------------------------------------


@pytest.mark.parametrize('kind', ['prompt', 'ptuning'])
def test_llama_export_gives_lorajax_logits_in_peft(kind, llama_dir, tmp_path):
  loaded = lorajax.models.load(llama_dir)
  tree = _llama_tree(loaded, kind)
  want = _ours(loaded, **prompts_lib.model_inputs(tree))
  out = peft_prompts.export_peft_prompt(tmp_path / 'peft', loaded.config,
                                        tree, source=llama_dir)
  cfg = json.loads((out / 'adapter_config.json').read_text())
  assert cfg['peft_type'] == ('PROMPT_TUNING' if kind == 'prompt'
                              else 'P_TUNING')
  peer = peft.PeftModel.from_pretrained(
      _peer(llama_dir, transformers.LlamaForCausalLM), out).eval()
  got = _peer_logits(peer)
  delta = _assert_close(want, got)
  print(f'{kind} export: max|Δlogit| {delta:.2e}')


@pytest.mark.parametrize('config_cls,extra', [
    (peft.PromptTuningConfig, {}),
    (peft.PromptEncoderConfig, {'encoder_hidden_size': 16}),
    (peft.PromptEncoderConfig, {'encoder_hidden_size': 16,
                                'encoder_reparameterization_type': 'LSTM'})],
                         ids=['prompt', 'ptuning', 'ptuning_lstm'])
def test_peft_made_llama_adapter_imports(config_cls, extra, llama_dir,
                                         tmp_path):
  want = _peft_made(llama_dir, transformers.LlamaForCausalLM,
                    config_cls(task_type='CAUSAL_LM', num_virtual_tokens=N,
                               **extra), tmp_path / 'a')
  loaded = lorajax.models.load(llama_dir)
  tree = peft_prompts.import_peft_prompt(tmp_path / 'a', loaded.config,
                                         source=llama_dir)
  assert tree['prompt'].shape == (N, 32)
  delta = _assert_close(_ours(loaded, **tree), want)
  print(f'{config_cls.__name__} {extra} import: max|Δlogit| {delta:.2e}')


# ---- what PEFT computes differently: checked, then refused ---------------------


def test_bert_classifier_prompt_is_refused_because_peft_pools_a_virtual_token(
    bert_dir, tmp_path):
  want = _peft_made(bert_dir, transformers.BertForSequenceClassification,
                    peft.PromptTuningConfig(task_type='SEQ_CLS',
                                            num_virtual_tokens=N),
                    tmp_path / 'a')
  loaded = lorajax.models.load(bert_dir)
  emb = jnp.asarray(peft.utils.load_peft_weights(str(tmp_path / 'a'))[
      'prompt_embeddings'].float().numpy())
  delta, scale = _delta(_ours(loaded, prompt=emb), want)
  assert delta > 0.1 * scale          # the numbers really differ
  with pytest.raises(peft_prompts.PeftPromptError, match='pools the first'):
    peft_prompts.import_peft_prompt(tmp_path / 'a', loaded.config,
                                    source=bert_dir)
  with pytest.raises(peft_prompts.PeftPromptError, match='pools the first'):
    peft_prompts.export_peft_prompt(tmp_path / 'out', loaded.config,
                                    {'prompt': emb}, source=bert_dir)
  assert not (tmp_path / 'out').exists()


def test_prefix_is_refused_because_peft_offsets_the_positions(llama_dir,
                                                              tmp_path):
  want = _peft_made(llama_dir, transformers.LlamaForCausalLM,
                    peft.PrefixTuningConfig(task_type='CAUSAL_LM',
                                            num_virtual_tokens=N),
                    tmp_path / 'a')
  loaded = lorajax.models.load(llama_dir)
  emb = peft.utils.load_peft_weights(str(tmp_path / 'a'))[
      'prompt_embeddings'].double().numpy()
  prefix = jnp.asarray(peft_prompts.prefix_from_peft(emb, loaded.config),
                       jnp.float32)
  np.testing.assert_array_equal(peft_prompts.prefix_to_peft(prefix),
                                emb.astype(np.float32))
  # The layout is PEFT's: with the real tokens' positions started at N,
  # lorajax gives PEFT's logits; with lorajax's own (from 0) it does not.
  shifted = jnp.broadcast_to(jnp.arange(IDS.shape[1]) + N, IDS.shape)
  _assert_close(_ours(loaded, prefix=prefix, positions=shifted), want)
  delta, scale = _delta(_ours(loaded, prefix=prefix), want)
  assert delta > 0.01 * scale
  with pytest.raises(peft_prompts.PeftPromptError, match='positions start'):
    peft_prompts.import_peft_prompt(tmp_path / 'a', loaded.config,
                                    source=llama_dir)
  with pytest.raises(peft_prompts.PeftPromptError, match='positions start'):
    peft_prompts.export_peft_prompt(tmp_path / 'out', loaded.config,
                                    {'prefix': prefix}, source=llama_dir)
  assert not (tmp_path / 'out').exists()


def test_bad_trees_and_fields_are_refused(llama_dir, tmp_path):
  loaded = lorajax.models.load(llama_dir)
  prompt = jnp.zeros((N, 32))
  with pytest.raises(peft_prompts.PeftPromptError, match='one method'):
    peft_prompts.export_peft_prompt(
        tmp_path / 'out', loaded.config,
        {'prompt': prompt, 'prefix': jnp.zeros((2, 2, N, 2, 8))},
        source=llama_dir)
  with pytest.raises(peft_prompts.PeftPromptError, match="head='base'"):
    peft_prompts.export_peft_prompt(tmp_path / 'out', loaded.config,
                                    {'prompt': prompt}, source=llama_dir,
                                    head='base')
  gemma_like = dataclasses.replace(loaded.config, scale_embeddings=True)
  with pytest.raises(peft_prompts.PeftPromptError,
                     match='scale_embeddings=True'):
    peft_prompts.export_peft_prompt(tmp_path / 'out', gemma_like,
                                    {'prompt': prompt})
  assert not (tmp_path / 'out').exists()
  out = peft_prompts.export_peft_prompt(tmp_path / 'ok', loaded.config,
                                        {'prompt': prompt}, source=llama_dir)
  cfg = json.loads((out / 'adapter_config.json').read_text())
  (out / 'adapter_config.json').write_text(json.dumps(
      dict(cfg, peft_type='P_TUNING', encoder_reparameterization_type='GRU')))
  with pytest.raises(ValueError, match="reparameterization_type='GRU'"):
    peft_prompts.import_peft_prompt(out, loaded.config, source=llama_dir)
  (out / 'adapter_config.json').write_text(json.dumps(
      dict(cfg, num_virtual_tokens=N + 1)))
  with pytest.raises(peft_prompts.PeftPromptError,
                     match='num_virtual_tokens=4'):
    peft_prompts.import_peft_prompt(out, loaded.config, source=llama_dir)


# ---- a run's export (lorajax.cli.export --format peft) --------------------------


def test_ptuning_lm_run_exports_for_peft(tmp_path):
  """A config-system P-tuning run on a tiny Qwen2 folder, exported as
  ``--format peft``: PeftModel gives the logits of the run's folded prompt
  in lorajax; other formats are refused."""
  model_dir = toy_models.tiny_qwen2_dir(tmp_path / 'qwen2')
  config = toy_models.load_config(
      'shakespeare_smollm2_lora', method='ptuning', num_train_steps=1,
      eval_every=1, **{'model.path': str(model_dir),
                       'ptuning.num_tokens': N, 'ptuning.encoder_hidden': 8})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  out = finished.export_checkpoint(config, str(tmp_path / 'run'),
                                   str(tmp_path / 'peft'), 'peft')
  cfg = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert (cfg['peft_type'], cfg['encoder_hidden_size']) == ('P_TUNING', 8)
  with np.load(summary['prompts_file']) as folded:
    prompt = jnp.asarray(folded['prompt'])
  loaded = lorajax.models.load(model_dir)
  want = _ours(loaded, prompt=prompt)
  peer = peft.PeftModel.from_pretrained(
      _peer(model_dir, transformers.Qwen2ForCausalLM), out).eval()
  delta = _assert_close(want, _peer_logits(peer))
  print(f'P-tuning run export (Qwen2): max|Δlogit| {delta:.2e}')
  with pytest.raises(ValueError, match="trains virtual tokens.*'merged'"):
    finished.export_checkpoint(config, str(tmp_path / 'run'),
                               str(tmp_path / 'merged'), 'merged')
  assert not (tmp_path / 'merged').exists()
  with config.unlocked():   # A leaf trained besides: not in PEFT's file.
    config.train_rules = r'.*final_norm.*'
  with pytest.raises(ValueError, match=r"train_rules='.\*final_norm"):
    finished.export_checkpoint(config, str(tmp_path / 'run'),
                               str(tmp_path / 'more'), 'peft')
