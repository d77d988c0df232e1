"""LoKr and VeRA: providers, and Hugging Face PEFT 0.21.2 (the peer) both
ways on a tiny BERT and a tiny Llama written by transformers'
save_pretrained, and training through the config system."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.io import spec_json
from lorajax.methods import lokr as lokr_lib
from lorajax.methods import vera as vera_lib
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import train

import toy_models
from test_more_methods import _check_provider

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

# Sizes chosen so LoKr's factorization is not trivial (32 = 4·8, 48 = 6·8,
# 37 prime -> 1·37) and VeRA's projections are sized by the largest kernel.
CASES = {
    'bert': ('BertConfig', 'BertForSequenceClassification', dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, vocab_size=67, max_position_embeddings=40,
        initializer_range=0.3, num_labels=3)),
    'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, vocab_size=67,
        initializer_range=0.2)),
}
# PEFT target suffixes, and lorajax's regex for the same modules.
TARGETS = {
    'bert': (['query', 'value', 'intermediate.dense'],
             r'.*/(attention/(query|value)|intermediate)/kernel'),
    'llama': (['q_proj', 'v_proj', 'down_proj'],
              r'.*/(attn/(q_proj|v_proj)|mlp/down_proj)/kernel'),
}
IDS = np.random.default_rng(0).integers(3, 67, (2, 9))
MASK = np.ones_like(IDS)
MASK[1, 6:] = 0
MEASURED = {}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  made = {}

  def get(name):
    if name not in made:
      config_cls, model_cls, fields = CASES[name]
      torch.manual_seed(0)
      model = getattr(transformers, model_cls)(
          getattr(transformers, config_cls)(**fields))
      made[name] = tmp_path_factory.mktemp(name)
      model.save_pretrained(made[name])
    return made[name]
  return get


def _torch_model(directory, name):
  cls = getattr(transformers, CASES[name][1])
  return cls.from_pretrained(directory, attn_implementation='eager').eval()


def _torch_logits(model, name):
  with torch.no_grad():
    return model(input_ids=torch.tensor(IDS), attention_mask=(
        torch.tensor(MASK) if name == 'bert' else None)).logits.numpy()


def _ours(model, spec, adapters, name, params=None):
  fn = jax.jit(lorajax.lora(model.apply, spec))
  return np.asarray(fn(model.params if params is None else params, adapters,
                       jnp.asarray(IDS),
                       jnp.asarray(MASK) if name == 'bert' else None))


def _close(what, got, want):
  delta = float(np.abs(got - want).max())
  MEASURED[what] = delta
  print(f'{what}: max |dlogit| {delta:.2e}')
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=what)


def _spec(method, name, model):
  if method == 'lokr':
    provider = lorajax.LoKr(rank=2, alpha=3.0)
  else:
    provider = lorajax.Vera(rank=4, seed=5)
  spec = LoraSpec([(TARGETS[name][1], provider), ('.*', 'freeze')])
  return vera_lib.bind_projections(spec, model.params)


# ---- providers -----------------------------------------------------------


PROVIDERS = {
    'lokr': lorajax.LoKr(rank=2, alpha=4),
    'lokr_both': lorajax.LoKr(rank=1, decompose_both=True),
    'vera': lorajax.Vera(rank=2, projections=vera_lib.VeraProjections.random(
        2, 8, 8, seed=3))}


@pytest.mark.parametrize('name,use', [
    ('lokr', 'flax'), ('lokr', 'multi_in'), ('lokr', 'lhs'),
    ('lokr', 'torch'), ('lokr_both', 'multi_out'),
    ('vera', 'flax'), ('vera', 'multi_in'), ('vera', 'lhs')])
def test_merged_equals_adapted_and_base_at_init(name, use):
  """float32: adapted == merged (1e-5), unmerge restores, gradients equal
  the merged formulation's, and the base at init."""
  _check_provider(use, PROVIDERS[name])


def test_lokr_factors_match_peft_shapes_and_init():
  """Which factors exist, their shapes and PEFT's default start."""
  for (n_in, n_out), kw in [((20, 12), {}), ((64, 48), {}),
                            ((64, 48), dict(decompose_both=True)),
                            ((64, 48), dict(decompose_factor=4))]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    pm = peft.get_peft_model(net, peft.LoKrConfig(
        r=2, alpha=4, target_modules=['0'], **kw))
    theirs = {n.split('.')[-2]: p.detach().numpy()
              for n, p in pm.named_parameters() if 'lokr_' in n}
    provider = lorajax.LoKr(rank=2, alpha=4, **kw)
    swap = {'w1_a': 'w1_b', 'w1_b': 'w1_a', 'w2_a': 'w2_b', 'w2_b': 'w2_a'}
    shapes = provider.factor_shapes(n_in, n_out)
    assert {'lokr_' + swap.get(k, k): s[::-1] for k, s in shapes.items()} == {
        k: v.shape for k, v in theirs.items()}, (n_in, n_out, kw)
    draws = [lorajax.init(LoraSpec([('w', provider)]),
                          {'w': jnp.zeros((n_in, n_out))},
                          jax.random.key(i))['w'] for i in range(30)]
    for k in shapes:
      peft_v = theirs['lokr_' + swap.get(k, k)]
      ours = np.stack([np.asarray(d[k]) for d in draws])
      if not peft_v.any():        # PEFT's zero factor is ours too.
        assert not ours.any(), k
        continue
      # kaiming_uniform(a=sqrt(5)) of PEFT's [out, in] tensor: U(±1/sqrt(in)).
      bound = 1 / np.sqrt(peft_v.shape[1])
      assert np.abs(peft_v).max() <= bound
      assert 0.9 * bound < np.abs(ours).max() <= bound, k


def test_vera_trains_only_its_vectors(checkpoints):
  """The projections are no leaf of the trainable tree, gradients reach
  lambda_d and lambda_b, and trainable_report counts what PEFT counts."""
  directory = checkpoints('bert')
  model = lorajax.models.load(directory)
  spec = _spec('vera', 'bert', model)
  adapters = lorajax.init(spec, model.params, jax.random.key(1))
  leaves = {jax.tree_util.keystr(p).split("'")[-2]
            for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
  assert leaves == {'lambda_d', 'lambda_b'}
  fn = lorajax.lora(model.apply, spec)
  grads = jax.grad(lambda ad: jnp.sum(fn(model.params, ad, jnp.asarray(IDS))
                                      ** 2))(adapters)
  flat = dict(lorajax.spec.flatten_paths(grads))
  assert len(flat) == 2 * 6
  for path, g in flat.items():   # lambda_b starts at 0, so d lambda_d = 0
    assert (float(jnp.abs(g).max()) > 0) == path.endswith('lambda_b'), path
  n_ours = lorajax.count(adapters)
  report = lorajax.trainable_report(spec, model.params, adapters)
  assert report.startswith(f'trainable params: {n_ours:,d} ||')
  pm = peft.get_peft_model(_torch_model(directory, 'bert'), peft.VeraConfig(
      r=4, target_modules=TARGETS['bert'][0]))
  assert n_ours == pm.get_nb_trainable_parameters()[0] == 2 * (3 * 4 + 32 + 32 + 48)
  # Spec JSON keeps the drawn projections (by seed) and given ones.
  assert spec_json.spec_from_json(spec_json.spec_to_json(spec)) == spec
  given = LoraSpec([('w', lorajax.Vera(rank=2, projections=vera_lib.
                                       VeraProjections(np.ones((2, 3)),
                                                       np.ones((4, 2)))))])
  assert spec_json.spec_from_json(spec_json.spec_to_json(given)) == given


# ---- lorajax -> PEFT -> lorajax --------------------------------------------


@pytest.mark.parametrize('method', ['lokr', 'vera'])
@pytest.mark.parametrize('name', ['bert', 'llama'])
def test_export_loads_in_peft(checkpoints, tmp_path, name, method):
  directory = checkpoints(name)
  model = lorajax.models.load(directory)
  spec = _spec(method, name, model)
  adapters = toy_models.perturb(
      lorajax.init(spec, model.params, jax.random.key(1)), seed=2,
      scale=0.3 if method == 'lokr' else 1.0)
  ours = _ours(model, spec, adapters, name)
  base = _torch_logits(_torch_model(directory, name), name)
  assert np.abs(ours - base).max() > 1e-2   # the adapter changes the logits
  peft_export.export_peft(tmp_path, model.config, spec, adapters, model.params,
                          source=directory)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['peft_type'] == method.upper()
  pm = peft.PeftModel.from_pretrained(_torch_model(directory, name), tmp_path)
  _close(f'{name} {method} lorajax->PEFT', ours, _torch_logits(pm, name))
  back = peft_format.import_peft(tmp_path, model.config, model.params,
                                 source=directory)
  assert [a for _, a in back.spec.rules if not isinstance(a, str)] == [
      a for _, a in spec.rules if not isinstance(a, str)]
  again = _ours(model, back.spec, back.adapters, name,
                back.params_for(model.params))
  _close(f'{name} {method} round trip', again, ours)


# ---- PEFT -> lorajax ---------------------------------------------------------


def _peft_made(directory, name, method, out, **kw):
  torch.manual_seed(0)
  if method == 'lokr':
    cfg = peft.LoKrConfig(**{'r': 2, 'alpha': 5, **kw},
                          target_modules=TARGETS[name][0], init_weights=False)
  else:
    cfg = peft.VeraConfig(r=4, target_modules=TARGETS[name][0],
                          init_weights=False, **kw)
  pm = peft.get_peft_model(_torch_model(directory, name), cfg)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'lokr_' in n or 'vera_lambda' in n:
        p.add_(torch.randn_like(p) * 0.3)
  pm.save_pretrained(out)
  return _torch_logits(pm.eval(), name)


@pytest.mark.parametrize('name,method,kw', [
    ('bert', 'lokr', {}), ('bert', 'vera', {}), ('llama', 'lokr', {}),
    ('llama', 'vera', {}), ('llama', 'lokr', dict(decompose_both=True, r=1)),
    ('llama', 'lokr', dict(decompose_factor=4, rank_pattern={'q_proj': 8},
                           alpha_pattern={'v_proj': 1.5}))],
                         ids=['bert-lokr', 'bert-vera', 'llama-lokr',
                              'llama-vera', 'llama-lokr_both',
                              'llama-lokr_factor'])
def test_peft_adapter_imports(checkpoints, tmp_path, name, method, kw):
  directory = checkpoints(name)
  model = lorajax.models.load(directory)
  theirs = _peft_made(directory, name, method, tmp_path, **kw)
  base = _torch_logits(_torch_model(directory, name), name)
  assert np.abs(theirs - base).max() > 1e-2
  imported = peft_format.import_peft(tmp_path, model.config, model.params,
                                     source=directory)
  ours = _ours(model, imported.spec, imported.adapters, name,
               imported.params_for(model.params))
  _close(f'{name} {method}{kw or ""} PEFT->lorajax', ours, theirs)


@pytest.mark.parametrize('method,field,value', [
    ('lokr', 'rank_dropout', 0.1), ('lokr', 'module_dropout', 0.2),
    ('lokr', 'use_effective_conv2d', True), ('vera', 'vera_dropout', 0.1),
    ('vera', 'save_projection', False), ('vera', 'bias', 'all'),
    ('vera', 'fan_in_fan_out', True)])
def test_unimplemented_peft_options_are_refused(checkpoints, tmp_path, method,
                                                field, value):
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  _peft_made(directory, 'llama', method, tmp_path)
  path = tmp_path / 'adapter_config.json'
  cfg = json.loads(path.read_text())
  cfg[field] = value
  path.write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError,
                     match=rf'{field}={value!r} is not supported'):
    peft_format.import_peft(tmp_path, model.config, model.params,
                            source=directory)


def test_vera_without_saved_projections_is_refused(checkpoints, tmp_path):
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  _peft_made(directory, 'llama', 'vera', tmp_path, save_projection=False)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  cfg['save_projection'] = True   # claims them, the file has none
  (tmp_path / 'adapter_config.json').write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError,
                     match='without its projections'):
    peft_format.import_peft(tmp_path, model.config, model.params,
                            source=directory)


def test_mixed_lokr_options_are_refused_on_export(checkpoints, tmp_path):
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  spec = LoraSpec([(r'.*/q_proj/kernel', lorajax.LoKr(rank=2)),
                   (r'.*/v_proj/kernel', lorajax.LoKr(rank=2,
                                                     decompose_both=True)),
                   ('.*', 'freeze')])
  adapters = lorajax.init(spec, model.params, jax.random.key(0))
  with pytest.raises(peft_format.PeftFormatError, match='decompose_both'):
    peft_export.export_peft(tmp_path / 'x', model.config, spec, adapters,
                            model.params, source=directory)
  assert not (tmp_path / 'x').exists()


def test_factorization_is_peft_s():
  from peft.tuners.lokr.layer import factorization  # pylint: disable=g-import-not-at-top
  for n in (1, 7, 12, 37, 48, 64, 96, 128, 360, 4096):
    for f in (-1, 1, 3, 4, 8, 10):
      assert lokr_lib.factorization(n, f) == factorization(n, f), (n, f)


# ---- the config system -----------------------------------------------------


@pytest.mark.parametrize('method', ['lokr', 'vera'])
def test_config_method_trains_and_resumes_exactly(method, tmp_path):
  """config.method='lokr'/'vera' through the config system (smoke MiniLM,
  rank 8 on query and value); VeRA resumes exactly (its projections are
  drawn again from config.seed)."""
  config = toy_models.load_config(
      'rt_minilm_methods', method=method, num_train_steps=2, eval_every=2,
      checkpoint_every=1)
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(config, str(workdir))
  rows = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(rows) == [1, 2]
  assert all(np.isfinite(r['loss']) for r in rows.values())
  assert summary['method'] == method
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  shapes = {p: s for p, (s, _) in meta['shapes'].items()
            if p.startswith('adapters/')}
  want = {'vera': lambda i, o: {'lambda_d': (8,), 'lambda_b': (o,)},
          'lokr': lambda i, o: lorajax.LoKr(rank=8).factor_shapes(i, o)}
  task = train.tasks.build_task(config)
  kernels = dict(lorajax.spec.flatten_paths(task.split_params()[1]))
  assert shapes
  for p, s in shapes.items():
    kernel_path, leaf = p[len('adapters/'):].rsplit('/', 1)
    n_in, n_out = np.shape(kernels[kernel_path])
    assert tuple(s) == tuple(want[method](n_in, n_out)[leaf]), p
  if method != 'vera':
    return
  # Resume from step 1: the same final parameters and step-2 loss.
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / '2')
  os.remove(again / 'summary.json')
  os.remove(again / 'metrics.jsonl')
  assert train.train_and_evaluate(config, str(again))['resumed_from'] == 1

  def final(folder):
    out, _ = ckpt_lib.restore_trainable(
        folder / 'checkpoints', ckpt_lib.abstract(task.split_params()[0]),
        ckpt_lib.read_meta(folder / 'checkpoints')[1], 2)
    return jax.device_get(out)

  for a, b in zip(jax.tree.leaves(final(again)), jax.tree.leaves(final(
      workdir))):
    np.testing.assert_array_equal(a, b)
  resumed = metrics_lib.read_jsonl(str(again / 'metrics.jsonl'))
  assert [r['loss'] for r in resumed.values()] == [rows[2]['loss']]


def test_zz_print_measured():
  for what, delta in sorted(MEASURED.items()):
    print(f'{what}: {delta:.2e}')
