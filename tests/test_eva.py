"""EVA (Lora(init='eva'), lorajax.eva.init) against PEFT 0.21.2's EVA on a
tiny BERT and Llama written by transformers' save_pretrained, with the same
batches on both sides: the per-kernel ranks, the lora_A subspaces, exports
both ways; the incremental PCA against PEFT's own (exact-SVD mode); the
config path; and what is refused."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.methods import eva
from lorajax.methods import eva_pca
from lorajax.training import config as config_lib
from lorajax.training import finished
from lorajax.training import tasks
from lorajax.training import train

import toy_models
from test_kron_vera import _torch_model
from test_kron_vera import checkpoints  # pylint: disable=unused-import

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
from peft.tuners.lora import eva as peft_eva  # pylint: disable=g-import-not-at-top,wrong-import-position

# PEFT target names (regex: the layers' Linears, not BERT's pooler) and
# lorajax's regex for the same kernels.
TARGETS = {
    'bert': (r'.*layer\.\d+\..*(query|key|value|dense)',
             r'.*layer_\d+/(attention/(query|key|value|output)|intermediate'
             r'|output)/kernel'),
    'llama': (['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
               'up_proj', 'down_proj'], r'.*layers_\d+/.*_proj/kernel'),
}
RANK, ALPHA, RHO, TAU = 4, 8.0, 2.0, 0.99
MEASURED = {}


def _batches(n=6, b=8, t=16, seed=0):
  """Right-padded batches of random tokens (numpy)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, 67, (b, t))
    mask = np.ones_like(ids)
    for row in range(b):
      mask[row, rng.integers(t // 2, t + 1):] = 0
    out.append({'input_ids': ids, 'attention_mask': mask})
  return out


BATCHES = _batches()


def _fn(model, name):
  if name == 'bert':
    return lambda p, batch: model.apply(p, batch['input_ids'],
                                        batch['attention_mask'])
  return lambda p, batch: model.apply(p, batch['input_ids'])


def _ours(name, directory, **config):
  model = lorajax.models.load(directory)
  spec = LoraSpec([(TARGETS[name][1], lorajax.Lora(RANK, alpha=ALPHA,
                                                   init='eva')),
                   ('.*', 'freeze')])
  out = eva.init(spec, model.params, BATCHES, fn=_fn(model, name),
                 token_mask=lambda batch: batch['attention_mask'],
                 config=eva.EvaConfig(rho=RHO, tau=TAU, **config))
  return model, out


def _peft_eva(directory, name, **config):
  """A PeftModel made EVA's way from the same batches."""
  cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                        target_modules=TARGETS[name][0],
                        init_lora_weights='eva',
                        eva_config=peft.EvaConfig(rho=RHO, tau=TAU, **config))
  pm = peft.get_peft_model(_torch_model(directory, name), cfg,
                           low_cpu_mem_usage=True)
  loader = [{k: torch.tensor(v) for k, v in b.items()} for b in BATCHES]
  peft_eva.initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
  return pm.eval()


def _lora_modules(pm):
  """HF module name -> (lora_A [r, in] numpy, scaling) of a PeftModel."""
  out = {}
  for name, module in pm.named_modules():
    if hasattr(module, 'lora_A') and 'default' in module.lora_A:
      key = name.split('base_model.model.', 1)[1]
      out[key] = (module.lora_A['default'].weight.detach().numpy().copy(),
                  float(module.scaling['default']))
  return out


@pytest.fixture(scope='module')
def both(checkpoints):
  made = {}

  def get(name):
    if name not in made:
      directory = checkpoints(name)
      model, ours = _ours(name, directory)
      made[name] = (directory, model, ours, _peft_eva(directory, name))
    return made[name]
  return get


def _torch_inputs(batch, name):
  """The batch for the PyTorch model: a causal Llama without the mask (its
  right padding changes only the padded positions' logits, which lorajax's
  Llama computes without a mask)."""
  keys = ('input_ids', 'attention_mask') if name == 'bert' else ('input_ids',)
  return {k: torch.tensor(batch[k]) for k in keys}


def _hf_names(model, directory, paths):
  hf = hf_models.hf_model(model.config, source=directory)
  return {p: hf.module_of(p) for p in paths}


@pytest.mark.parametrize('name', ['bert', 'llama'])
def test_ranks_and_subspaces_are_peft_s(both, name):
  directory, model, ours, pm = both(name)
  theirs = _lora_modules(pm)
  names = _hf_names(model, directory, ours.ranks)
  ranks = {names[p]: r for p, r in ours.ranks.items() if r}
  assert ranks == {k: a.shape[0] for k, (a, _) in theirs.items()}
  assert len(set(ranks.values())) > 1      # ranks were redistributed
  worst_entry = worst_gram = 0.0
  for path, rank in ours.ranks.items():
    a = np.asarray(lorajax.spec.get_by_path(ours.adapters, path)['a']).T
    want = theirs[names[path]][0]
    gram = a @ want.T       # ≈ ±I: same components, same order
    worst_gram = max(worst_gram, float(np.abs(np.abs(gram) - np.eye(rank))
                                       .max()))
    signs = np.sign(np.diag(gram))[:, None]
    worst_entry = max(worst_entry, float(np.abs(a * signs - want).max()))
  MEASURED[name] = (worst_gram, worst_entry, ours.steps)
  print(f'{name}: ranks {sorted(ranks.values())} equal PEFT\'s; max '
        f'||A Apeftᵀ| - I| {worst_gram:.1e}, max |a - a_peft| '
        f'{worst_entry:.1e} ({ours.steps} passes)')
  # PEFT's randomized SVD (svd_lowrank, q=2k, 4 power iterations) against
  # our exact one; measured 2e-4 (BERT) and 3e-3 (Llama).
  assert worst_gram <= 1e-2 and worst_entry <= 1e-2


@pytest.mark.parametrize('name', ['bert', 'llama'])
def test_export_loads_in_peft_with_its_rank_pattern(both, name, tmp_path):
  """The adapter (trained: a and b moved) exports with rank_pattern and
  alpha_pattern; PEFT builds the same ranks and scalings as its own EVA
  and computes lorajax's logits."""
  directory, model, ours, pm = both(name)
  adapters = toy_models.perturb(ours.adapters, seed=4, scale=0.2)
  fn = jax.jit(lorajax.lora(_fn(model, name), ours.spec))
  batch = BATCHES[0]
  logits = np.asarray(fn(model.params, adapters, batch))
  base = np.asarray(jax.jit(_fn(model, name))(model.params, batch))
  assert np.abs(logits - base).max() > 1e-2
  peft_export.export_peft(tmp_path, model.config, ours.spec, adapters,
                          model.params, source=directory)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['rank_pattern']       # not one rank for all
  loaded = peft.PeftModel.from_pretrained(_torch_model(directory, name),
                                          tmp_path).eval()
  got, want = _lora_modules(loaded), _lora_modules(pm)
  assert {k: (a.shape, s) for k, (a, s) in got.items()} == {
      k: (a.shape, s) for k, (a, s) in want.items()}
  with torch.no_grad():
    theirs = loaded(**_torch_inputs(batch, name)).logits.numpy()
  delta = float(np.abs(logits - theirs).max())
  MEASURED[f'{name} export'] = delta
  print(f'{name}: EVA adapter exported, PEFT max |dlogit| {delta:.1e}')
  assert delta <= 1e-4


def test_peft_made_eva_adapter_imports(both, tmp_path):
  """PEFT's EVA adapter (its config says init_lora_weights='eva') reads
  as a LoRA with its rank pattern and gives PEFT's logits."""
  directory, model, _, _ = both('llama')
  pm = _peft_eva(directory, 'llama')
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'lora_B' in n:
        p.add_(torch.randn_like(p) * 0.3)
  pm.save_pretrained(tmp_path)
  batch = BATCHES[1]
  with torch.no_grad():
    theirs = pm(**_torch_inputs(batch, 'llama')).logits.numpy()
  imported = peft_format.import_peft(tmp_path, model.config, model.params,
                                     source=directory)
  ours = np.asarray(jax.jit(lorajax.lora(_fn(model, 'llama'),
                                         imported.spec))(
      imported.params_for(model.params), imported.adapters, batch))
  delta = float(np.abs(ours - theirs).max())
  MEASURED['PEFT EVA import'] = delta
  print(f'PEFT-made EVA adapter imported: max |dlogit| {delta:.1e}')
  assert delta <= 1e-4


def test_incremental_pca_is_peft_s_in_exact_mode():
  from peft.utils.incremental_pca import IncrementalPCA  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  scales = np.linspace(3.0, 0.2, 12)
  ours, theirs = eva_pca.IncrementalPca(5, tau=0.99), IncrementalPCA(
      n_components=5, lowrank=False)
  for i in range(4):
    x = (rng.standard_normal((40, 12)) * scales + i * 0.1).astype(np.float32)
    previous = theirs.components_.clone() if i else None
    assert ours.partial_fit(x)
    theirs.partial_fit(torch.tensor(x))
    np.testing.assert_allclose(ours.components, theirs.components_.numpy(),
                               atol=2e-5)
    np.testing.assert_allclose(ours.ratio,
                               theirs.explained_variance_ratio_.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(ours.singular_values,
                               theirs.singular_values_.numpy(), rtol=1e-5)
    if previous is not None:
      cos = torch.nn.functional.cosine_similarity(theirs.components_,
                                                  previous).numpy()
      np.testing.assert_array_equal(ours.converged, cos >= 0.99)
  assert not ours.partial_fit(np.ones((3, 12)))   # fewer rows than k: skip


def _providers(out):
  """path -> provider of an EvaResult's spec (its rules are per path)."""
  by_pattern = {p: a for p, a in out.spec.rules if not isinstance(a, str)}
  return {path: by_pattern[re.escape(path)] for path, r in out.ranks.items()
          if r}


def test_whitening_alpha_and_rho_one(checkpoints):
  """whiten divides a's columns by √(singular value); alpha follows the
  rank (alpha·r'/r) unless adjust_scaling_factors=False; rho=1 keeps every
  kernel at its rule's rank."""
  directory = checkpoints('llama')
  _, plain = _ours('llama', directory, adjust_scaling_factors=False)
  model, white = _ours('llama', directory, whiten=True)
  assert plain.ranks == white.ranks
  for path, provider in _providers(white).items():
    a = np.asarray(lorajax.spec.get_by_path(plain.adapters, path)['a'])
    w = np.asarray(lorajax.spec.get_by_path(white.adapters, path)['a'])
    root = np.linalg.norm(a, axis=0) / np.linalg.norm(w, axis=0)  # √s
    assert np.all(root > 1.5) and np.all(np.diff(root) <= 1e-6), path
    assert provider.alpha == ALPHA * provider.rank / RANK
    assert _providers(plain)[path].alpha == ALPHA
  spec = LoraSpec([(TARGETS['llama'][1], lorajax.Lora(2, init='eva')),
                   ('.*', 'freeze')])
  out = eva.init(spec, model.params, BATCHES[:3], fn=_fn(model, 'llama'),
                 token_mask=lambda b: b['attention_mask'],
                 config=eva.EvaConfig(rho=1.0, tau=0.9))
  assert set(out.ranks.values()) == {2}
  assert all(p.alpha == 2.0 and p.init == 'eva'
             for p in _providers(out).values())


# ---- refusals ------------------------------------------------------------


def test_what_eva_does_not_do_is_refused(checkpoints):
  directory = checkpoints('llama')
  model = lorajax.models.load(directory)
  fn, mask = _fn(model, 'llama'), lambda b: b['attention_mask']
  eva_rule = (TARGETS['llama'][1], lorajax.Lora(RANK, init='eva'))
  spec = LoraSpec([eva_rule, ('.*', 'freeze')])
  with pytest.raises(ValueError, match=r"Lora\(init='eva'\) takes a from "
                     'the layer inputs'):
    lorajax.init(spec, model.params, jax.random.key(0))
  with pytest.raises(ValueError, match=r"QLora\(init='eva'\) is not "
                     'implemented'):
    lorajax.QLora(2, init='eva')
  dora = LoraSpec([(TARGETS['llama'][1], lorajax.Dora(2, init='eva')),
                   ('.*', 'freeze')])
  with pytest.raises(ValueError, match=r"Dora\(init='eva'\) is not "
                     'implemented'):
    eva.init(dora, model.params, BATCHES, fn=fn, token_mask=mask)
  mixed = LoraSpec([(r'.*layers_0/attn/q_proj/kernel', lorajax.Lora(2)),
                    eva_rule, ('.*', 'freeze')])
  with pytest.raises(ValueError, match='also has Lora'):
    eva.init(mixed, model.params, BATCHES, fn=fn, token_mask=mask)
  with pytest.raises(ValueError, match='did not converge in 2 passes'):
    eva.init(spec, model.params, BATCHES, fn=fn, token_mask=mask,
             config=eva.EvaConfig(max_steps=2))
  big = LoraSpec([(TARGETS['llama'][1], lorajax.Lora(20, init='eva')),
                  ('.*', 'freeze')])
  with pytest.raises(ValueError, match=r'rank·rho = 40 is more than its 32 '
                     'input features'):
    eva.init(big, model.params, BATCHES, fn=fn, token_mask=mask)
  with pytest.raises(ValueError, match='token mask'):
    eva.init(spec, model.params, BATCHES, fn=fn,
             token_mask=lambda b: b['attention_mask'][:, :4])
  with pytest.raises(ValueError, match='rho must be >= 1'):
    eva.EvaConfig(rho=0.5)
  with pytest.raises(ValueError, match=r'tau must be in \[0, 1\]'):
    eva.EvaConfig(tau=1.5)
  with pytest.raises(ValueError, match='needs at least one batch'):
    eva.init(spec, model.params, [], fn=fn)
  scanned = lorajax.models.load(directory, scan_layers=True)
  with pytest.raises(ValueError, match='stacked by scan'):
    eva.init(LoraSpec([(r'layers/.*_proj/kernel',
                        lorajax.Lora(2, init='eva')), ('.*', 'freeze')]),
             scanned.params, BATCHES, fn=_fn(scanned, 'llama'),
             token_mask=mask)


@pytest.mark.parametrize('method', ['dora', 'qlora', 'loha', 'oft'])
def test_config_refuses_eva_for_other_methods(method):
  config = config_lib.base_config('classification')
  config.lora.init, config.method = 'eva', method
  with pytest.raises(ValueError, match=r"lora.init='eva' is implemented for "
                     f"method 'lora', not '{method}'"):
    config_lib.make_spec(config)


def test_config_refuses_bad_eva_fields():
  from lorajax.training import eva_run  # pylint: disable=g-import-not-at-top
  from lorajax.training import model_loading  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config('classification')
  config.model.pretrained, config.model.size = False, 'tiny'
  config.lora.init = 'eva'
  model = model_loading.load_model(config)
  spec = config_lib.make_spec(config)
  for field, value, match in [('num_batches', 0, 'num_batches=0'),
                              ('rho', 0.5, 'config.eva: EVA rho must be'),
                              ('tau', 2.0, 'config.eva: EVA tau must be')]:
    bad = config.copy_and_resolve_references()
    bad.eva[field] = value
    with pytest.raises(ValueError, match=match):
      eva_run.fit(bad, model, spec)


# ---- the config system ---------------------------------------------------


def test_config_run_trains_and_exports_its_ranks(tmp_path):
  """lora.init='eva' (MiniLM smoke, 2 steps): the checkpoint's spec holds
  EVA's per-kernel rules, the export (which computes EVA again from the
  same batches) passes the checkpoint's spec check, and PEFT gives the
  run's logits."""
  config = toy_models.load_config(
      'rt_minilm_lora', num_train_steps=2, eval_every=2, checkpoint_every=2,
      **{'lora.init': 'eva', 'eva.num_batches': 4})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  task = tasks.build_task(config, splits=())
  rules = [a for _, a in task.spec.rules if not isinstance(a, str)]
  assert len(rules) == 4 and all(a.init == 'eva' for a in rules)
  path = 'encoder/layer_0/attention/query/kernel'
  start = lorajax.spec.get_by_path(task.adapters, path)
  a = np.asarray(start['a'])
  np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-5)
  assert not np.asarray(start['b']).any()
  out = {fmt: finished.export_checkpoint(config, workdir, str(tmp_path / fmt),
                                         fmt) for fmt in ('lorajax', 'peft')}
  bundle = lorajax.io.load_adapter(out['lorajax'], task.original_params)
  batch = {'input_ids': BATCHES[0]['input_ids'][:, :12] % 60 + 3,
           'attention_mask': BATCHES[0]['attention_mask'][:, :12],
           'token_type_ids': np.zeros((8, 12), np.int32)}
  apply_fn = tasks.classifier_apply(task.model.module, config.model.pooling)
  ours = np.asarray(jax.jit(lorajax.lora(apply_fn, bundle.spec))(
      bundle.params_for(task.original_params), bundle.adapters, batch))
  transformers = pytest.importorskip('transformers')
  hf_models.export_merged(tmp_path / 'base', task.model_config,
                          task.original_params)
  pm = peft.PeftModel.from_pretrained(
      transformers.AutoModelForSequenceClassification.from_pretrained(
          str(tmp_path / 'base')), out['peft']).eval()
  with torch.no_grad():
    theirs = pm(**{k: torch.tensor(v) for k, v in batch.items()}
                ).logits.numpy()
  delta = float(np.abs(ours - theirs).max())
  MEASURED['config export'] = delta
  print(f'EVA config run: PEFT export max |dlogit| {delta:.1e}')
  assert delta <= 1e-4


def test_a_kernel_multiplied_twice_is_fitted_on_the_masked_call_or_refused():
  """The shipped BERT's [CLS] readout multiplies its last layer's kernels a
  second time with one query: with a token mask EVA fits the call whose
  rows match it (the test above against PEFT runs through that); without
  one, two different inputs of one kernel are refused, naming it."""
  params = {'w': jnp.ones((4, 4)) / 4}
  batches = [np.random.default_rng(i).normal(size=(2, 5, 4)).astype(
      np.float32) for i in range(3)]

  def fn(p, x):   # the whole sequence, then its first row alone
    return (x @ p['w']).sum() + (x[:, :1] @ p['w']).sum()

  spec = LoraSpec([('w', lorajax.Lora(2, init='eva'))])
  with pytest.raises(ValueError, match=r"w: one call of fn multiplied it 2 "
                     r'times on different inputs \(\(2, 5\), \(2, 1\)\)'):
    eva.init(spec, params, batches, fn=fn)
  masked = eva.init(spec, params, batches, fn=fn,
                    token_mask=lambda x: np.ones(x.shape[:2], bool))
  whole = eva.init(spec, params, batches, fn=lambda p, x: (x @ p['w']).sum(),
                   token_mask=lambda x: np.ones(x.shape[:2], bool))
  np.testing.assert_allclose(masked.adapters['w']['a'],
                             whole.adapters['w']['a'], atol=1e-6)
