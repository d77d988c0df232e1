"""AdaLoRA: the provider, the rank allocator and the orthogonality penalty
against Hugging Face PEFT 0.21.2's own (same weights and gradients in torch
and JAX), PEFT's format both ways on the tiny BERT and Llama of
test_kron_vera, and training through the config system."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.io import spec_json
from lorajax.methods import adalora
from lorajax.methods import adalora_allocator as alloc_lib
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import train

import toy_models
from test_kron_vera import _ours
from test_kron_vera import _torch_logits
from test_kron_vera import _torch_model
from test_kron_vera import checkpoints  # pylint: disable=unused-import
from test_kron_vera import TARGETS
from test_more_methods import _check_provider

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

MEASURED = {}


def _close(what, got, want, tol=1e-4):
  delta = float(np.abs(got - want).max())
  MEASURED[what] = delta
  print(f'{what}: max |dlogit| {delta:.2e}')
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


@pytest.fixture(scope='module')
def loaded(checkpoints):  # pylint: disable=redefined-outer-name
  """``name -> (checkpoint directory, lorajax model)``, made once."""
  made = {}

  def get(name):
    if name not in made:
      made[name] = (checkpoints(name), lorajax.models.load(checkpoints(name)))
    return made[name]
  return get


@pytest.fixture(scope='module')
def peft_made(loaded, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """``name -> (PEFT-made adapter directory, PEFT's logits)``, made once
  (``_peft_made``); tests that edit it work on a copy."""
  made = {}

  def get(name):
    if name not in made:
      out = tmp_path_factory.mktemp(f'peft_{name}')
      made[name] = (out, _peft_made(loaded(name)[0], name, out))
    return made[name]
  return get


def _copy_of(directory, tmp_path):
  shutil.copytree(directory, tmp_path / 'adapter')
  return tmp_path / 'adapter'


# ---- the provider ----------------------------------------------------------


@pytest.mark.parametrize('use', ['flax', 'torch', 'multi_in', 'multi_out',
                                 'lhs'])
def test_merged_equals_adapted_and_base_at_init(use):
  """float32: adapted == merged (1e-5), unmerge restores, gradients equal
  the merged formulation's, and the base at init (e = 0)."""
  _check_provider(use, lorajax.AdaLora(init_r=3, alpha=5.0, total_step=4))


def test_delta_and_init_are_peft_s():
  """ΔW = B·(A·E)·alpha/(init_r + 1e-5) of PEFT's SVDLinear for a Flax
  [in, out] kernel, and PEFT's start: E zero, A and B N(0, 0.02)."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(7, 5, bias=False))
  pm = peft.get_peft_model(net, peft.AdaLoraConfig(
      init_r=3, lora_alpha=6, total_step=4, target_modules=['0']))
  layer = pm.base_model.model[0]
  with torch.no_grad():
    for name in ('lora_A', 'lora_E', 'lora_B'):
      getattr(layer, name)['default'].normal_()
  provider = lorajax.AdaLora(init_r=3, alpha=6.0, total_step=4)
  params = {'w': jnp.asarray(layer.base_layer.weight.detach().numpy().T)}
  ours = lorajax.init(LoraSpec([('w', provider)]), params, jax.random.key(0))
  assert not np.asarray(ours['w']['e']).any()
  draws = np.concatenate([np.ravel(lorajax.init(
      LoraSpec([('w', provider)]), params, jax.random.key(i))['w'][k])
                          for i in range(20) for k in ('a', 'b')])
  assert abs(draws.std() - 0.02) < 0.002 and abs(draws.mean()) < 0.002
  ad = {'w': ours['w'].replace(
      a=jnp.asarray(layer.lora_A['default'].detach().numpy().T),
      e=jnp.asarray(layer.lora_E['default'].detach().numpy()[:, 0]),
      b=jnp.asarray(layer.lora_B['default'].detach().numpy().T))}
  merged = lorajax.merge(params, ad, LoraSpec([('w', provider)]))
  with torch.no_grad():
    layer.merge()
  np.testing.assert_allclose(merged['w'],
                             layer.base_layer.weight.detach().numpy().T,
                             rtol=1e-6, atol=1e-6)
  assert spec_json.spec_from_json(spec_json.spec_to_json(
      LoraSpec([('w', provider)]))) == LoraSpec([('w', provider)])


# ---- the allocator against PEFT's RankAllocator ------------------------------


class _Net(torch.nn.Module):
  """Three Linears of different shapes; forward returns ``.loss`` (zero
  times the output) so that PEFT's AdaLoraModel adds its penalty."""

  def __init__(self):
    super().__init__()
    self.l0 = torch.nn.Linear(6, 5)
    self.l1 = torch.nn.Linear(5, 9)
    self.l2 = torch.nn.Linear(9, 4)

  def forward(self, x):
    return types.SimpleNamespace(
        loss=0.0 * self.l2(self.l1(self.l0(x))).sum())


def _peft_net(**kw):
  torch.manual_seed(0)
  return peft.get_peft_model(_Net(), peft.AdaLoraConfig(
      target_modules=['l0', 'l1', 'l2'], **kw))


def _ours_net(**kw):
  """Our spec, adapters and allocator for the same three kernels."""
  shapes = {'l0': (6, 5), 'l1': (5, 9), 'l2': (9, 4)}
  params = {k: {'kernel': jnp.zeros(s)} for k, s in shapes.items()}
  provider = lorajax.AdaLora(**kw)
  spec = LoraSpec([('.*', provider)])
  adapters = lorajax.init(spec, params, jax.random.key(0))
  return spec, params, adapters, alloc_lib.RankAllocator.from_spec(
      spec, params)


def _set_both(pm, adapters, rng):
  """Draws every factor and gradient, puts them in PEFT's model (A = aᵀ,
  E = e[:, None], B = bᵀ) and returns ours."""
  params, grads = {}, {}
  for name, node in adapters.items():
    layer = getattr(pm.base_model.model, name)
    p, g = {}, {}
    for k, torch_name in (('a', 'lora_A'), ('e', 'lora_E'), ('b', 'lora_B')):
      p[k] = rng.normal(size=node['kernel'][k].shape).astype(np.float32)
      g[k] = rng.normal(size=node['kernel'][k].shape).astype(np.float32)
      param = getattr(layer, torch_name)['default']
      to_torch = (lambda x: x.T) if k != 'e' else (lambda x: x[:, None])
      with torch.no_grad():
        param.copy_(torch.tensor(to_torch(p[k])))
      param.grad = torch.tensor(np.ascontiguousarray(to_torch(g[k])))
    params[name] = {'kernel': node['kernel'].replace(**p)}
    grads[name] = {'kernel': node['kernel'].replace(**g)}
  return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads)


SCHEDULES = {
    'warmup_final_delta2': dict(init_r=6, target_r=2, total_step=24, tinit=3,
                                tfinal=5, delta_t=2),
    'plain': dict(init_r=5, target_r=1, total_step=12, beta1=0.6,
                  beta2=0.9),
}


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_budget_schedule_is_peft_s(name):
  kw = SCHEDULES[name]
  pm = _peft_net(**{('deltaT' if k == 'delta_t' else k): v
                    for k, v in kw.items()})
  theirs = pm.base_model.rankallocator
  _, _, adapters, allocator = _ours_net(**kw)
  assert allocator.budgets(adapters) == (theirs.init_bgt, theirs.target_bgt)
  budgets, flags = allocator.table(adapters)
  for step in range(kw['total_step'] + 2):
    want = theirs.budget_schedule(step)
    assert alloc_lib.budget_schedule(
        allocator.schedule, step, init_bgt=theirs.init_bgt,
        target_bgt=theirs.target_bgt) == want, step
    assert (int(budgets[step]), bool(flags[step])) == want, step
  assert len(set(budgets.tolist())) > 3   # the cubic phase has many values


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_mask_matches_peft_rank_allocator(name):
  """Every step: the same parameters and gradients in both, PEFT's
  update_and_allocate(step) against our jitted update; the zeroed e
  entries must agree, through the warm-up, the falling budget, the final
  allocation and the fixed mask after it."""
  kw = SCHEDULES[name]
  pm = _peft_net(**{('deltaT' if k == 'delta_t' else k): v
                    for k, v in kw.items()})
  _, _, adapters, allocator = _ours_net(**kw)
  state = allocator.init(adapters)

  @jax.jit
  def update(state, params, grads):
    drop, state = allocator.update(state, params, grads)
    return allocator.apply(params, drop), state

  rng = np.random.default_rng(0)
  agree = total = masked = 0
  for step in range(1, kw['total_step'] + 3):
    params, grads = _set_both(pm, adapters, rng)
    ours, state = update(state, params, grads)
    pm.base_model.update_and_allocate(step)
    for layer in adapters:
      theirs = getattr(pm.base_model.model, layer).lora_E['default']
      theirs_zero = theirs.detach().numpy()[:, 0] == 0
      ours_zero = np.asarray(ours[layer]['kernel']['e']) == 0
      agree += int((theirs_zero == ours_zero).sum())
      total += theirs_zero.size
      masked += int(theirs_zero.sum())
  MEASURED[f'mask agreement {name}'] = agree / total
  print(f'{name}: mask agreement {agree}/{total} ({masked} masked)')
  assert masked > total // 4
  assert agree == total
  assert int(state.count) == kw['total_step'] + 2


def test_scanned_layers_count_as_kernels():
  """A kernel stacked by scan [L, in, out] is L kernels of PEFT's: its
  adapters' triplets compete with the others' and the budget counts L."""
  rng = np.random.default_rng(1)
  kw = dict(init_r=3, target_r=1, total_step=4)
  layout = lorajax.KernelLayout(1, (0,), (1,))
  stacked = {k: rng.normal(size=s).astype(np.float32)
             for k, s in (('a', (2, 5, 3)), ('e', (2, 3)), ('b', (2, 3, 4)))}
  grads = {k: rng.normal(size=v.shape).astype(np.float32)
           for k, v in stacked.items()}
  one = alloc_lib.RankAllocator(lorajax.AdaLora(**kw), ('w',))
  tree = {'w': lorajax.AdapterParams(stacked, layout=layout)}
  gtree = {'w': lorajax.AdapterParams(grads, layout=layout)}
  assert one.budgets(tree) == (6, 2)
  drop, _ = one.update(one.init(tree), tree, gtree)
  split = alloc_lib.RankAllocator(lorajax.AdaLora(**kw), ('w0', 'w1'))
  flat = {f'w{i}': {k: v[i] for k, v in stacked.items()} for i in range(2)}
  gflat = {f'w{i}': {k: v[i] for k, v in grads.items()} for i in range(2)}
  drop2, _ = split.update(split.init(flat), flat, gflat)
  np.testing.assert_array_equal(np.asarray(drop['w']), np.stack(
      [np.asarray(drop2['w0']), np.asarray(drop2['w1'])]))
  budget, _ = alloc_lib.budget_schedule(one.schedule, 1, init_bgt=6,
                                        target_bgt=2)
  assert np.asarray(drop['w']).sum() == 6 - budget == 3   # int(4·.75³ + 2)


def test_orth_regularization_is_peft_s():
  """orth_reg_weight·mean(‖AAᵀ-I‖, ‖BᵀB-I‖) as AdaLoraModel.forward adds
  it to the loss, and training_hooks adds exactly that to a loss."""
  kw = dict(init_r=4, target_r=2, total_step=6, orth_reg_weight=0.3)
  pm = _peft_net(**kw)
  spec, params, adapters, allocator = _ours_net(**kw)
  ours_params, _ = _set_both(pm, adapters, np.random.default_rng(2))
  theirs = float(pm.base_model(torch.zeros(1, 6)).loss.detach())
  value = float(adalora.orth_regularization(ours_params, allocator.paths,
                                            0.3))
  MEASURED['orth reg |d|'] = abs(value - theirs)
  np.testing.assert_allclose(value, theirs, rtol=1e-5)
  loss_fn = lambda tr, fr, b, r: (jnp.float32(1.5), {})  # pylint: disable=unnecessary-lambda-assignment
  hooked, _ = alloc_lib.training_hooks(spec, params, loss_fn,
                                       __import__('optax').sgd(0.1))
  got, _ = hooked({'adapters': ours_params, 'params': {}}, None, None, None)
  np.testing.assert_allclose(float(got), 1.5 + theirs, rtol=1e-5)


def test_rank_allocation_zeroes_e_exactly_and_keeps_optimizer_state():
  """Behind optax: the dropped e are exactly 0 after apply_updates, the
  rest is what the wrapped optimizer computes (to float rounding: jit
  fuses differently); jit does not recompile."""
  import optax  # pylint: disable=g-import-not-at-top
  spec, params, adapters, allocator = _ours_net(init_r=4, target_r=1,
                                                total_step=3)
  tx = alloc_lib.rank_allocation(optax.adam(0.1), allocator)
  inner = optax.adam(0.1)
  state, plain = tx.init(adapters), inner.init(adapters)
  grads = toy_models.perturb(jax.tree.map(jnp.zeros_like, adapters), 3, 1.0)

  @jax.jit
  def step(grads, state, plain, adapters):
    updates, state = tx.update(grads, state, adapters)
    want, plain = inner.update(grads, plain, adapters)
    return (optax.apply_updates(adapters, updates), state,
            optax.apply_updates(adapters, want), plain)

  for _ in range(2):
    new, state, want, plain = step(grads, state, plain, adapters)
    for layer in new:
      e, e_want = new[layer]['kernel']['e'], want[layer]['kernel']['e']
      zero = np.asarray(e) == 0
      assert zero.any()
      np.testing.assert_allclose(np.asarray(e)[~zero],
                                 np.asarray(e_want)[~zero], rtol=1e-6)
      np.testing.assert_allclose(new[layer]['kernel']['a'],
                                 want[layer]['kernel']['a'], rtol=1e-6)
    adapters = new
  assert step._cache_size() == 1  # pylint: disable=protected-access
  del spec, params


# ---- lorajax -> PEFT -> lorajax --------------------------------------------


def _allocated(spec, model, seed):
  """Random adapters after one real allocation (random gradients): some e
  are zero, so PEFT's rank_pattern is not trivial."""
  adapters = toy_models.perturb(
      lorajax.init(spec, model.params, jax.random.key(seed)), seed=seed + 1,
      scale=0.3)
  allocator = alloc_lib.RankAllocator.from_spec(spec, model.params)
  state = allocator.init(adapters)
  for step in range(1, 4):   # the specs below allocate by step 3
    grads = toy_models.perturb(jax.tree.map(jnp.zeros_like, adapters),
                               seed=seed + step, scale=1.0)
    drop, state = allocator.update(state, adapters, grads)
    adapters = allocator.apply(adapters, drop)
  return adapters


@pytest.mark.parametrize('name', ['bert', 'llama'])
def test_export_loads_in_peft(loaded, tmp_path, name):  # pylint: disable=redefined-outer-name
  directory, model = loaded(name)
  provider = lorajax.AdaLora(init_r=4, target_r=2, alpha=6.0, total_step=10,
                             tinit=1, tfinal=2, delta_t=3, beta1=0.7,
                             orth_reg_weight=0.2)
  spec = LoraSpec([(TARGETS[name][1], provider), ('.*', 'freeze')])
  adapters = _allocated(spec, model, seed=1)
  if name == 'llama':   # a kernel with no triplet left: PEFT's rank 0
    node = adapters['layers_1']['mlp']['down_proj']['kernel']
    adapters['layers_1']['mlp']['down_proj']['kernel'] = node.replace(
        e=jnp.zeros_like(node['e']))
  ours = _ours(model, spec, adapters, name)
  base = _torch_logits(_torch_model(directory, name), name)
  assert np.abs(ours - base).max() > 1e-2   # the adapter changes the logits
  peft_export.export_peft(tmp_path, model.config, spec, adapters, model.params,
                          source=directory)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['peft_type'] == 'ADALORA'
  assert (cfg['init_r'], cfg['target_r'], cfg['total_step'], cfg['tinit'],
          cfg['tfinal'], cfg['deltaT'], cfg['lora_alpha']) == (
              4, 2, 10, 1, 2, 3, 6.0)
  pattern = cfg['rank_pattern']
  kept = {m: sum(v) for m, v in pattern.items()}
  assert len(pattern) == 6 and 0 < sum(kept.values()) < 24
  if name == 'llama':
    assert kept['model.layers.1.mlp.down_proj.lora_E'] == 0
  pm = peft.PeftModel.from_pretrained(_torch_model(directory, name), tmp_path)
  for module, n in kept.items():   # PEFT built each module at its rank
    layer = pm.base_model.model.get_submodule(module[:-len('.lora_E')])
    assert layer.lora_E['default'].shape == (n, 1), module
  _close(f'{name} adalora lorajax->PEFT', ours, _torch_logits(pm, name))
  back = peft_format.import_peft(tmp_path, model.config, model.params,
                                 source=directory)
  assert [a for _, a in back.spec.rules if not isinstance(a, str)] == [
      provider]
  flat = dict(lorajax.spec.flatten_paths(adapters))
  for path, value in lorajax.spec.flatten_paths(back.adapters):
    node, k = path.rsplit('/', 1)   # the slots in use come back, 0 elsewhere
    keep = np.asarray(flat[f'{node}/e']) != 0
    want = np.asarray(flat[path]) * (keep if k == 'e' else keep[:, None]
                                     if k == 'b' else keep[None, :])
    np.testing.assert_array_equal(value, want, err_msg=path)
  again = _ours(model, back.spec, back.adapters, name,
                back.params_for(model.params))
  _close(f'{name} adalora round trip', again, ours)


# ---- PEFT -> lorajax ---------------------------------------------------------


def _peft_made(directory, name, out, **kw):
  """A PEFT AdaLoRA adapter with random non-zero factors, after one
  backward pass and one allocation of PEFT's own (so rank_pattern drops
  some triplets); returns PEFT's logits."""
  torch.manual_seed(0)
  pm = peft.get_peft_model(_torch_model(directory, name), peft.AdaLoraConfig(
      **{'init_r': 4, 'target_r': 2, 'total_step': 6, 'lora_alpha': 5,
         **kw}, target_modules=TARGETS[name][0]))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if 'lora_' in n:
        p.copy_(torch.randn_like(p) * 0.3)
  ids = torch.tensor(np.random.default_rng(0).integers(3, 67, (2, 9)))
  labels = ids if name == 'llama' else torch.tensor([0, 2])
  pm.train()
  pm(input_ids=ids, labels=labels).loss.backward()
  pm.base_model.update_and_allocate(1)
  pm.save_pretrained(out)
  return _torch_logits(pm.eval(), name)


@pytest.mark.parametrize('name', ['bert', 'llama'])
def test_peft_adapter_imports(loaded, peft_made, name):  # pylint: disable=redefined-outer-name
  directory, model = loaded(name)
  made, theirs = peft_made(name)
  cfg = json.loads((made / 'adapter_config.json').read_text())
  assert any(not all(v) for v in cfg['rank_pattern'].values())
  base = _torch_logits(_torch_model(directory, name), name)
  assert np.abs(theirs - base).max() > 1e-2
  imported = peft_format.import_peft(made, model.config, model.params,
                                     source=directory)
  es = [np.asarray(v) for p, v in lorajax.spec.flatten_paths(
      imported.adapters) if p.endswith('/e')]
  # Every slot is back (init_r each), zeros where the pattern dropped one.
  assert sorted(e.shape for e in es) == [(4,)] * 6
  assert sorted(tuple(e != 0) for e in es) == sorted(
      tuple(v) for v in cfg['rank_pattern'].values())
  ours = _ours(model, imported.spec, imported.adapters, name,
               imported.params_for(model.params))
  _close(f'{name} adalora PEFT->lorajax', ours, theirs)


@pytest.mark.parametrize('field,value,match', [
    ('fan_in_fan_out', True, 'fan_in_fan_out=True is not supported'),
    ('bias', 'all', "bias='all' is not supported"),
    ('use_dora', True, 'use_dora=True is not supported'),
    ('lora_alpha', 0, 'lora_alpha=0 is not supported'),
    ('init_r', None, 'init_r=None'),
    ('rank_pattern', {'model.layers.0.self_attn.q_proj.lora_E': [True]},
     'expected init_r=4 booleans'),
    ('total_step', None, 'total_step=None'),
])
def test_unimplemented_or_malformed_peft_configs_are_refused(
    loaded, peft_made, tmp_path, field, value, match):  # pylint: disable=redefined-outer-name
  directory, model = loaded('llama')
  adapter = _copy_of(peft_made('llama')[0], tmp_path)
  path = adapter / 'adapter_config.json'
  cfg = json.loads(path.read_text())
  cfg[field] = value
  path.write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError, match=match):
    peft_format.import_peft(adapter, model.config, model.params,
                            source=directory)


def test_tensors_that_disagree_with_rank_pattern_are_refused(
    loaded, peft_made, tmp_path):  # pylint: disable=redefined-outer-name
  directory, model = loaded('llama')
  adapter = _copy_of(peft_made('llama')[0], tmp_path)
  path = adapter / 'adapter_config.json'
  cfg = json.loads(path.read_text())
  key = sorted(k for k, v in cfg['rank_pattern'].items() if not all(v))[0]
  cfg['rank_pattern'][key] = [True] * 4
  path.write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError,
                     match='its rank_pattern keeps 4'):
    peft_format.import_peft(adapter, model.config, model.params,
                            source=directory)


def test_exports_peft_cannot_express_are_refused(loaded, tmp_path):  # pylint: disable=redefined-outer-name
  directory, model = loaded('llama')
  cases = {
      'one AdaLoraConfig': [
          (r'.*/q_proj/kernel', lorajax.AdaLora(init_r=4, total_step=5)),
          (r'.*/v_proj/kernel', lorajax.AdaLora(init_r=2, total_step=5))],
      'total_step is None': [(r'.*/q_proj/kernel', lorajax.AdaLora(
          init_r=4))],
      'holds one method': [
          (r'.*/q_proj/kernel', lorajax.AdaLora(init_r=4, total_step=5)),
          (r'.*/v_proj/kernel', lorajax.Lora(rank=2))],
  }
  for match, rules in cases.items():
    spec = LoraSpec(rules + [('.*', 'freeze')])
    adapters = lorajax.init(spec, model.params, jax.random.key(0))
    with pytest.raises(peft_format.PeftFormatError, match=match):
      peft_export.export_peft(tmp_path / 'x', model.config, spec, adapters,
                              model.params, source=directory)
    assert not (tmp_path / 'x').exists()


# ---- refusals of the provider, the allocator and the config ---------------


@pytest.mark.parametrize('kw,match', [
    (dict(init_r=0), 'init_r=0'),
    (dict(beta1=1.0), 'beta1=1.0'),
    (dict(alpha=-1.0), 'alpha=-1.0'),
    (dict(orth_reg_weight=-0.1), 'orth_reg_weight=-0.1'),
    (dict(total_step=10, tinit=5, tfinal=5), 'tinit < total_step - tfinal'),
    (dict(delta_t=0), 'delta_t=0'),
])
def test_bad_provider_fields_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    lorajax.AdaLora(**kw)


def test_allocator_refusals():
  params = {'q': jnp.zeros((4, 4)), 'v': jnp.zeros((4, 4))}
  with pytest.raises(ValueError, match='total_step is None'):
    alloc_lib.RankAllocator.from_spec(
        LoraSpec([('.*', lorajax.AdaLora(init_r=2))]), params)
  with pytest.raises(ValueError, match='target_r=3 is larger than init_r=2'):
    alloc_lib.RankAllocator.from_spec(LoraSpec([('.*', lorajax.AdaLora(
        init_r=2, target_r=3, total_step=4))]), params)
  with pytest.raises(ValueError, match=r'differ in tinit: 0 vs 1'):
    alloc_lib.RankAllocator.from_spec(LoraSpec([
        ('q', lorajax.AdaLora(init_r=2, target_r=1, total_step=4)),
        ('v', lorajax.AdaLora(init_r=2, target_r=1, total_step=4, tinit=1))
    ]), params)
  assert alloc_lib.RankAllocator.from_spec(
      LoraSpec([('.*', lorajax.Lora(rank=2))]), params) is None


@pytest.mark.parametrize('fields,match', [
    ({'adalora.tinit': 1, 'adalora.tfinal': 1}, 'tinit < total_step - tfinal'),
    ({'adalora.target_r': 9}, 'target_r=9 is larger than adalora.init_r=4'),
    ({'lora.rank': 4}, "has no lora.rank"),
    ({'adalora.beta2': 0.0}, 'beta2=0.0'),
])
def test_config_refusals(fields, match):
  config = toy_models.load_config('rt_minilm_methods', method='adalora',
                                  num_train_steps=2,
                                  **{'adalora.init_r': 4,
                                     'adalora.target_r': 2, **fields})
  with pytest.raises(ValueError, match=match):
    config_lib.make_spec(config)


# ---- the config system -----------------------------------------------------


def test_config_method_trains_and_resumes_exactly(tmp_path):
  """config.method='adalora' (smoke MiniLM, init_r 4 -> target_r 2 on
  query and value, 2 steps): the last step allocates the final budget, and
  a run resumed from step 1 (allocator EMAs from the checkpoint) ends with
  the same adapters and step-2 loss."""
  config = toy_models.load_config(
      'rt_minilm_methods', method='adalora', num_train_steps=2, eval_every=2,
      checkpoint_every=1, **{'adalora.init_r': 4, 'adalora.target_r': 2})
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(config, str(workdir))
  rows = metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert list(rows) == [1, 2] and summary['method'] == 'adalora'
  task = train.tasks.build_task(config)

  def final(folder):
    out, _ = ckpt_lib.restore_trainable(
        folder / 'checkpoints', ckpt_lib.abstract(task.split_params()[0]),
        ckpt_lib.read_meta(folder / 'checkpoints')[1], 2)
    return jax.device_get(out)

  adapters = final(workdir)['adapters']
  es = [np.asarray(v) for p, v in lorajax.spec.flatten_paths(adapters)
        if p.endswith('/e')]
  assert es and all(e.shape == (4,) for e in es)
  assert sum(int((e != 0).sum()) for e in es) == 2 * len(es)  # target_bgt
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  shutil.rmtree(again / 'checkpoints' / '2')
  os.remove(again / 'summary.json')
  os.remove(again / 'metrics.jsonl')
  assert train.train_and_evaluate(config, str(again))['resumed_from'] == 1
  for a, b in zip(jax.tree.leaves(final(again)), jax.tree.leaves(final(
      workdir))):
    np.testing.assert_array_equal(a, b)
  resumed = metrics_lib.read_jsonl(str(again / 'metrics.jsonl'))
  assert [r['loss'] for r in resumed.values()] == [rows[2]['loss']]


def test_zz_print_measured():
  for what, delta in sorted(MEASURED.items()):
    print(f'{what}: {delta:.2e}')
