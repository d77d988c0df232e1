"""Adapter files: spec JSON, safetensors/Orbax round trips, base checks."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.io import adapter_files
from lorajax.io import spec_json
from lorajax.models import bert
from lorajax.models import llama

IDS = jnp.array([[2, 7, 9, 4, 1], [3, 3, 8, 0, 0]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)


@functools.cache
def _bert(seed=0, **overrides):
  fields = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                intermediate_size=32, max_position=16)
  config = bert.BertConfig(**(fields | overrides))
  model = bert.Bert(config)
  params = jax.jit(model.init)(jax.random.key(seed), IDS)['params']
  return model, params


def _randomize(tree, seed=3, scale=0.2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
      tree)


SPEC = LoraSpec([(r'.*/attention/(query|value)/kernel',
                  Lora(rank=2, alpha=4, use_rslora=True, dropout=0.1)),
                 (r'classifier/.*', 'train'),
                 (r'.*', 'freeze')])


@functools.cache
def _trained_setup():
  model, params = _bert()
  adapters = _randomize(lorajax.init(SPEC, params, jax.random.key(1)))
  tuned = dict(params)
  tuned['classifier'] = _randomize(params['classifier'], seed=9)
  return model, params, tuned, adapters


# ---- spec JSON ---------------------------------------------------------------


@pytest.mark.parametrize('provider', [
    Lora(rank=8), Lora(rank=4, alpha=16.0), Lora(rank=3, alpha=2,
                                                 use_rslora=True),
    Lora(rank=2, dropout=0.25, init='gaussian')])
def test_spec_json_round_trip(provider):
  spec = LoraSpec([(r'.*/q/kernel', provider), ('head/.*', 'train'),
                   ('.*', 'freeze')])
  text = json.dumps(spec_json.spec_to_json(spec))
  assert spec_json.spec_from_json(text) == spec


def test_spec_json_unknown_method_and_provider():
  with pytest.raises(ValueError, match="method 'NoSuchMethod'.*known: .*Lora"):
    spec_json.spec_from_json({'format': 1, 'rules': [
        ['.*', {'method': 'NoSuchMethod', 'rank': 2}]]})
  with pytest.raises(ValueError, match='format 7'):
    spec_json.spec_from_json({'format': 7, 'rules': []})

  class Odd(lorajax.spec.Adapter):
    pass

  with pytest.raises(TypeError, match='not registered'):
    spec_json.spec_to_json(LoraSpec([('.*', Odd())]))


# ---- round trips -------------------------------------------------------------


@pytest.mark.parametrize('fmt', adapter_files.FORMATS)
def test_save_load_round_trip_runs_the_same(tmp_path, fmt):
  model, params, tuned, adapters = _trained_setup()
  apply_fn = lambda p, *a, **k: model.apply({'params': p}, *a, **k)
  fn = jax.jit(lorajax.lora(apply_fn, SPEC))
  want = fn(tuned, adapters, IDS, MASK).logits
  adapter_files.save_adapter(tmp_path / 'ad', SPEC, adapters, tuned,
                             format=fmt, metadata={'step': 12})
  bundle = adapter_files.load_adapter(tmp_path / 'ad', params)
  assert bundle.spec == SPEC and bundle.metadata == {'step': 12}
  for a, b in zip(jax.tree.leaves(bundle.adapters), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(a, b)
  # The trained head comes back; the frozen base is not in the file.
  assert set(bundle.trained) == {'classifier'}
  got = fn(bundle.params_for(params), bundle.adapters, IDS, MASK).logits
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_file_holds_no_frozen_weights(tmp_path):
  _, _, tuned, adapters = _trained_setup()
  adapter_files.save_adapter(tmp_path, SPEC, adapters, tuned)
  meta = json.loads((tmp_path / adapter_files.META_FILE).read_text())
  assert all(k.startswith(('adapters/', 'trained/classifier/'))
             for k in meta['tensors'])
  assert len(meta['tensors']) == 2 * 2 * 2 + 2


# ---- bad input -----------------------------------------------------------------


def test_adapter_for_another_base_is_refused(tmp_path):
  _, _, tuned, adapters = _trained_setup()
  adapter_files.save_adapter(tmp_path, SPEC, adapters, tuned)
  _, wider = _bert(hidden_size=24, num_heads=2)
  with pytest.raises(adapter_files.AdapterFileError,
                     match=r'another base model.*shapes differ: .*\(16, 16\) '
                           r'vs this base \(24, 24\)'):
    adapter_files.load_adapter(tmp_path, wider)
  config = llama.LlamaConfig.tiny()
  lparams = jax.eval_shape(llama.Llama(config).init, jax.random.key(0),
                           IDS)['params']
  with pytest.raises(adapter_files.AdapterFileError, match='does not fit'):
    adapter_files.load_adapter(tmp_path, lparams)


def test_same_shapes_other_weights(tmp_path):
  _, _, tuned, adapters = _trained_setup()
  adapter_files.save_adapter(tmp_path, SPEC, adapters, tuned)
  _, params = _bert()
  other = _randomize(params, seed=5, scale=0.1)
  with pytest.raises(adapter_files.AdapterFileError, match='other weights'):
    adapter_files.load_adapter(tmp_path, other)
  bundle = adapter_files.load_adapter(tmp_path, other, check_weights=False)
  assert bundle.spec == SPEC
  # A bfloat16 copy of the same base still matches.
  half = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  adapter_files.load_adapter(tmp_path, half)


def test_corrupted_safetensors(tmp_path):
  _, _, tuned, adapters = _trained_setup()
  adapter_files.save_adapter(tmp_path, SPEC, adapters, tuned)
  target = tmp_path / adapter_files.TENSOR_FILE
  data = bytearray(target.read_bytes())
  data[-5] ^= 0xFF                                  # a flipped weight byte
  target.write_bytes(bytes(data))
  with pytest.raises(adapter_files.AdapterFileError, match='sha256'):
    adapter_files.load_adapter(tmp_path)
  target.write_bytes(bytes(data[:40]))              # truncated header
  with pytest.raises(adapter_files.AdapterFileError,
                     match='not a readable safetensors file'):
    adapter_files.read_safetensors(target)
  meta = json.loads((tmp_path / adapter_files.META_FILE).read_text())
  del meta['sha256']
  (tmp_path / adapter_files.META_FILE).write_text(json.dumps(meta))
  with pytest.raises(adapter_files.AdapterFileError, match='truncated'):
    adapter_files.load_adapter(tmp_path)


def test_missing_or_foreign_directory(tmp_path):
  with pytest.raises(adapter_files.AdapterFileError, match='no adapter.json'):
    adapter_files.load_adapter(tmp_path)
  (tmp_path / 'adapter_config.json').write_text('{}')
  with pytest.raises(adapter_files.AdapterFileError, match='import_peft'):
    adapter_files.load_adapter(tmp_path)
