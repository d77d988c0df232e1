"""Many adapters on one base: per-example mixes, registry, combination."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.methods import multi
from lorajax.models import bert_loading
from lorajax.models import bert
from lorajax.models import llama
from lorajax.models import lm
from lorajax.serving import weighted
from lorajax.serving.registry import AdapterRegistry

TOKENS = jnp.array([[5, 9, 13, 2, 7, 1]] * 5, jnp.int32) + jnp.arange(5)[:, None]
# Example i of the batch runs adapter INDEX[i]; -1 is the base.
INDEX = jnp.array([2, -1, 0, 3, 1], jnp.int32)


_merge = jax.jit(lorajax.merge, static_argnums=2)


def _randomize(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
      tree)


def _four_adapters(params, apply_fn, args, kernels):
  """Four adapters of different ranks, alphas and targets (cached)."""
  key = (id(params), kernels)
  if key not in _CACHE:
    _CACHE[key] = _make_four(params, apply_fn, args, kernels)
  return list(_CACHE[key])


_CACHE = {}


def _make_four(params, apply_fn, args, kernels):
  k0, k1 = kernels
  specs = [LoraSpec([(k0, Lora(rank=4, alpha=8))]),
           LoraSpec([(k1, Lora(rank=2, alpha=1))]),
           LoraSpec([(f'(?:{k0}|{k1})', Lora(rank=3, alpha=5, use_rslora=True))]),
           LoraSpec([(k0, Lora(rank=1)), (k1, Lora(rank=6, alpha=3))])]
  specs = [LoraSpec(list(s.rules) + [('.*', 'freeze')]) for s in specs]
  out = []
  for i, spec in enumerate(specs):
    ad = lorajax.init(spec, params, jax.random.key(i), fn=apply_fn, args=args)
    out.append((_randomize(ad, seed=i, scale=0.05), spec))
  return out


@functools.cache
def _tiny_llama(scan: bool):
  config = llama.LlamaConfig.tiny(scan_layers=scan)
  model = llama.Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), TOKENS)['params']
  apply_fn = lambda p, *a, **k: model.apply({'params': p}, *a, **k)
  return apply_fn, params


@functools.cache
def _minilm():
  config, params = bert_loading.load_minilm(num_labels=2)
  model = bert.Bert(config)
  apply_fn = lambda p, *a, **k: model.apply({'params': p}, *a, **k).logits
  return apply_fn, params


def _check_mixed(apply_fn, params, entries, mode):
  spec, stacked = multi.stack_adapters(entries, params, mode=mode)
  fn = jax.jit(lorajax.lora(apply_fn, spec))
  mixed = fn(params, stacked, TOKENS, lora_context=INDEX)
  alone = jax.jit(apply_fn)
  for i, k in enumerate(np.asarray(INDEX)):
    p = params if k < 0 else _merge(params, *entries[k])
    want = alone(p, TOKENS[i:i + 1])
    np.testing.assert_allclose(mixed[i:i + 1], want, rtol=1e-4, atol=1e-4)
  # Another mix reuses the compiled function.
  fn(params, stacked, TOKENS, lora_context=INDEX[::-1])
  assert fn._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize('scan,mode', [(False, 'gather'), (True, 'dense')])
def test_mixed_batch_equals_each_example_merged_llama(scan, mode):
  apply_fn, params = _tiny_llama(scan)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           (r'.*attn/(q|v)_proj/kernel', r'.*mlp/down_proj/kernel'))
  _check_mixed(apply_fn, params, entries, mode)


def test_mixed_batch_equals_each_example_merged_minilm():
  apply_fn, params = _minilm()
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           (r'.*/attention/(query|value)/kernel',
                            r'.*/layer_\d/output/kernel'))
  _check_mixed(apply_fn, params, entries, 'gather')


def test_mixed_generation_with_kv_cache():
  apply_fn, params = _tiny_llama(False)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           (r'.*attn/q_proj/kernel', r'.*mlp/up_proj/kernel'))
  spec, stacked = multi.stack_adapters(entries, params)
  wrapped = lorajax.lora(apply_fn, spec)

  def mixed_apply(tree, *a, **k):
    return wrapped(tree['p'], tree['ad'], *a, lora_context=tree['idx'], **k)

  tree = {'p': params, 'ad': stacked, 'idx': INDEX}
  got = lm.generate(mixed_apply, tree, TOKENS, 4)
  for i, k in enumerate(np.asarray(INDEX)):
    p = params if k < 0 else _merge(params, *entries[k])
    want = lm.generate(apply_fn, p, TOKENS[i:i + 1], 4)
    np.testing.assert_array_equal(got[i:i + 1], want)


# ---- registry ------------------------------------------------------------------


def _registry():
  apply_fn, params = _tiny_llama(False)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           (r'.*attn/(q|v)_proj/kernel', r'.*mlp/down_proj/kernel'))
  reg = AdapterRegistry(apply_fn, params)
  for name, (ad, spec) in zip('abcd', entries):
    reg.add(name, ad, spec)
  # 'e' has a's targets and ranks but another alpha and other weights.
  ad_a, spec_a = entries[0]
  spec_e = LoraSpec([(spec_a.rules[0][0], Lora(rank=4, alpha=2)),
                     ('.*', 'freeze')])
  reg.add('e', _randomize(ad_a, seed=11), spec_e)
  return reg, apply_fn, params, entries + [(reg.entry('e').adapters, None)]


def test_switching_same_shape_adapters_does_not_recompile():
  reg, apply_fn, params, entries = _registry()
  reg.activate('a')
  ya = reg(TOKENS)
  n = reg.compiled_count()
  reg.activate('e')
  ye = reg(TOKENS)
  reg.activate('a')
  reg(TOKENS)
  assert reg.compiled_count() == n == 1
  assert not np.allclose(ya, ye)
  np.testing.assert_allclose(
      ya, apply_fn(_merge(params, *entries[0]), TOKENS),
      rtol=1e-4, atol=1e-4)
  # Generation through `bound` reuses its compilations too.
  fa, ta = reg.bound('a')
  fe, te = reg.bound('e')
  assert fa is fe
  lm.generate(fa, ta, TOKENS[:1], 2)
  size = lm._prefill._cache_size()  # pylint: disable=protected-access
  lm.generate(fe, te, TOKENS[:1], 2)
  assert lm._prefill._cache_size() == size  # pylint: disable=protected-access


def test_disable_is_the_base_and_mixed_names():
  reg, apply_fn, params, _ = _registry()
  reg.activate('b')
  reg.disable()
  np.testing.assert_array_equal(reg(TOKENS), jax.jit(apply_fn)(params, TOKENS))
  names = ['e', None, 'a', 'e', 'c']
  mixed = reg.apply_mixed(names, TOKENS)
  for i, name in enumerate(names[:4]):  # 'a' and 'e' share one compilation.
    np.testing.assert_allclose(mixed[i], reg.apply(name, TOKENS)[i],
                               rtol=1e-4, atol=1e-4)
  with pytest.raises(KeyError, match="no adapter 'zz'"):
    reg.activate('zz')
  with pytest.raises(ValueError, match='registered already'):
    reg.add('a', *_four_adapters(params, apply_fn, (TOKENS,),
                                 ('.*q_proj/kernel', '.*v_proj/kernel'))[0])


# ---- combination -------------------------------------------------------------


def _deltas(entries, params):
  return [jax.tree.map(lambda m, p: np.asarray(m, np.float64) - p,
                       _merge(params, ad, spec), params)
          for ad, spec in entries]


def _weighted(weights, trees):
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)),
                      *trees)


def test_cat_is_the_exact_weighted_sum():
  _, params = _tiny_llama(True)
  apply_fn, _ = _tiny_llama(True)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           ('.*q_proj/kernel', '.*down_proj/kernel'))[:3]
  w = [0.5, -1.0, 2.0]
  ad, spec = weighted.weighted_adapter(entries, params, weights=w,
                                       method='cat')
  want = _weighted(w, _deltas(entries, params))
  got = _deltas([(ad, spec)], params)[0]
  for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, x, atol=1e-5)


def test_svd_gives_the_best_rank_k_update():
  apply_fn, params = _tiny_llama(False)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           ('.*q_proj/kernel', '.*down_proj/kernel'))[:2]
  ad, spec = weighted.weighted_adapter(entries, params, weights=[1.0, 0.7],
                                       method='svd', rank=2)
  want = _weighted([1.0, 0.7], _deltas(entries, params))
  got = _deltas([(ad, spec)], params)[0]
  path = 'layers_1/attn/q_proj/kernel'
  dense = lorajax.spec.get_by_path(want, path)
  u, s, vt = np.linalg.svd(dense)
  best = (u[:, :2] * s[:2]) @ vt[:2]
  np.testing.assert_allclose(lorajax.spec.get_by_path(got, path), best,
                             atol=1e-5)
  assert lorajax.spec.get_by_path(ad, path)['a'].shape == (32, 2)


def test_linear_is_exact_for_shared_a_and_needs_one_rank():
  apply_fn, params = _tiny_llama(False)
  (ad, spec), = _four_adapters(params, apply_fn, (TOKENS,),
                               ('.*q_proj/kernel', '.*v_proj/kernel'))[:1]
  other = jax.tree_util.tree_map_with_path(
      lambda p, x: x if p[-1].key == 'a' else -2 * x, ad)
  got, gspec = weighted.weighted_adapter(
      [(ad, spec), (other, spec)], params, weights=[0.5, 0.25],
      method='linear')
  # 0.5·Δ + 0.25·(−2Δ) = 0: the base.
  for g, p in zip(jax.tree.leaves(_merge(params, got, gspec)),
                  jax.tree.leaves(params)):
    np.testing.assert_allclose(g, p, atol=1e-6)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           ('.*q_proj/kernel', '.*v_proj/kernel'))
  with pytest.raises(ValueError, match="'linear' needs one rank"):
    weighted.weighted_adapter([entries[0], entries[2]], params,
                              method='linear')
  with pytest.raises(ValueError, match='target rank'):
    weighted.weighted_adapter(entries[:2], params, method='svd')


# ---- errors ---------------------------------------------------------------------


def test_multilora_needs_indices_of_the_batch():
  apply_fn, params = _tiny_llama(False)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           ('.*q_proj/kernel', '.*v_proj/kernel'))
  spec, stacked = multi.stack_adapters(entries, params)
  fn = lorajax.lora(apply_fn, spec)
  with pytest.raises(ValueError, match='lora_context=indices'):
    fn(params, stacked, TOKENS)
  with pytest.raises(ValueError, match=r'indices have shape \(2,\)'):
    fn(params, stacked, TOKENS, lora_context=jnp.array([0, 1]))
  with_head = LoraSpec([('.*q_proj/kernel', Lora(rank=2)),
                        ('final_norm/scale', 'train'), ('.*', 'freeze')])
  ad = lorajax.init(with_head, params, jax.random.key(0))
  with pytest.raises(ValueError, match='outright'):
    multi.stack_adapters([(ad, with_head)], params)


def test_generate_command_loads_either_format(tmp_path):
  from experiments import generate  # pylint: disable=g-import-not-at-top
  from lorajax.io import adapter_files  # pylint: disable=g-import-not-at-top
  from lorajax.io import peft_export  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig.tiny()
  apply_fn, params = _tiny_llama(False)
  (ad, spec), = _four_adapters(params, apply_fn, (TOKENS,),
                               ('.*q_proj/kernel', '.*v_proj/kernel'))[:1]
  adapter_files.save_adapter(tmp_path / 'lj', spec, ad, params)
  peft_export.export_peft(tmp_path / 'peft', config, spec, ad, params)
  want = lm.generate(apply_fn, _merge(params, ad, spec), TOKENS[:2], 3)
  for name in ('lj', 'peft'):
    bundle = generate.load_adapter(tmp_path / name, config, params)
    fn, tree = generate.adapted_apply(llama.Llama(config), params, bundle)
    np.testing.assert_array_equal(lm.generate(fn, tree, TOKENS[:2], 3), want)
  with pytest.raises(FileNotFoundError, match='neither'):
    generate.load_adapter(tmp_path, config, params)


def test_generate_command_runs_a_checkpoint_directory(tmp_path):
  """--model: a Hugging Face decoder folder, with its own tokenizer, chat
  template and EOS id; the text is the model's greedy continuation."""
  pytest.importorskip('transformers')
  from experiments import generate  # pylint: disable=g-import-not-at-top
  from toy_models import tiny_qwen2_dir  # pylint: disable=g-import-not-at-top
  import lorajax.models  # pylint: disable=g-import-not-at-top
  tiny_qwen2_dir(tmp_path)
  text, stats = generate.generate_text('Hi there', model=str(tmp_path),
                                       max_new_tokens=5)
  loaded = lorajax.models.load(tmp_path)
  from lorajax.data import chat as chat_lib  # pylint: disable=g-import-not-at-top
  template = chat_lib.ChatTemplate(loaded.chat_template,
                                   loaded.special_tokens)
  ids, _ = chat_lib.encode_chat(loaded.tokenizer, template,
                                [{'role': 'user', 'content': 'Hi there'}],
                                add_generation_prompt=True)
  assert stats['prompt_tokens'] == len(ids)
  apply = lambda p, *a, **k: loaded.module.apply({'params': p}, *a, **k)
  out = lm.generate(apply, loaded.params, jnp.asarray([ids]), 5,
                    eos_id=loaded.eos_id)[0].tolist()
  if loaded.eos_id in out:
    out = out[:out.index(loaded.eos_id)]
  assert text == loaded.tokenizer.decode(out)


@pytest.mark.parametrize('mode', multi.STACK_MODES)
def test_select_takes_one_adapter_back_out(mode):
  apply_fn, params = _tiny_llama(True)
  entries = _four_adapters(params, apply_fn, (TOKENS,),
                           (r'.*attn/(q|v)_proj/kernel', r'.*mlp/down_proj/kernel'))
  spec, stacked = multi.stack_adapters(entries, params, mode=mode)
  for i in (0, 3):
    one_spec, one = multi.select(stacked, spec, params, i)
    got = _deltas([(one, one_spec)], params)[0]
    want = _deltas([entries[i]], params)[0]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=1e-6)


def test_generation_stops_at_any_of_the_checkpoints_eos_ids(tmp_path):
  """generation_config.json may list several EOS ids (Llama 3, Gemma):
  generation stops at whichever comes first, as transformers' does."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import lorajax.models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, vocab_size=97,
      initializer_range=0.5)).eval()
  prompt = torch.tensor([[5, 17, 42, 8]])
  peer.generation_config.eos_token_id = None
  free = peer.generate(prompt, max_new_tokens=8, do_sample=False)[0, 4:]
  free = free.tolist()
  stop = free[3]  # The first step that makes this token ends generation.
  first = free.index(stop)
  eos = [next(t for t in range(97) if t not in free), stop]
  peer.generation_config.eos_token_id = eos
  peer.save_pretrained(tmp_path)
  want = peer.generate(prompt, max_new_tokens=8, do_sample=False)[0, 4:]
  assert want.tolist() == free[:first + 1]
  loaded = lorajax.models.load(tmp_path)
  assert loaded.eos_ids == tuple(eos) and loaded.eos_id == eos[0]
  apply = lambda p, *a, **k: loaded.module.apply({'params': p}, *a, **k)
  got = lm.generate(apply, loaded.params, jnp.asarray(prompt.numpy()), 8,
                    eos_id=loaded.eos_ids)[0].tolist()
  assert got[:first + 1] == free[:first + 1]
  assert got[first + 1:] == [stop] * (7 - first)  # Finished rows repeat it.


def test_generate_command_runs_a_peft_adapter_on_a_checkpoint(tmp_path):
  """--model DIR --adapter PEFT_DIR: PEFT's own greedy continuation."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  from experiments import generate  # pylint: disable=g-import-not-at-top
  from toy_models import tiny_qwen2_dir  # pylint: disable=g-import-not-at-top
  tiny_qwen2_dir(tmp_path / 'model')
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'model')
  torch.manual_seed(1)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj']))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.5)
  model.save_pretrained(tmp_path / 'peft')
  text, _ = generate.generate_text('Hi', model=str(tmp_path / 'model'),
                                   adapter=str(tmp_path / 'peft'),
                                   max_new_tokens=6, chat=False)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / 'model' / 'tokenizer.json'))
  ids = torch.tensor([tok('Hi')['input_ids']])
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    want = model.eval().generate(input_ids=ids, max_new_tokens=6,
                                 do_sample=False)[0, ids.shape[1]:]
  assert text == tok.decode(want.tolist())
