"""Data from the user's files: formats, splits, bad rows, a 3-class run, and
evaluation and export of a finished run from its workdir alone."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lorajax.data import file_splits
from lorajax.data import files
from lorajax.io import digests
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import saved_run
from lorajax.training import train

from toy_models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {'pos': ('great', 'lovely', 'superb'), 'neg': ('awful', 'dull', 'bad'),
         'mixed': ('okay', 'uneven', 'average')}


def _rows(n=150):
  """Reviews of 3 classes (strings), 30 movies, deterministic."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    label = sorted(WORDS)[i % 3]
    word = WORDS[label][rng.integers(3)]
    out.append({'review': f'a {word} film, number {i}', 'sentiment': label,
                'movie': f'movie{i % 30}'})
  return out


def _write_csv(path, rows):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return str(path)


def _write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


def _data(path, tmp_path, **kw):
  kw.setdefault('fields', files.Fields('review', label='sentiment'))
  return file_splits.FileData(str(path), cache_root=str(tmp_path / 'cache'),
                              **kw)


# ---- formats ----------------------------------------------------------------


def test_csv_jsonl_and_parquet_read_the_same_rows(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = _rows(40)
  paths = [_write_csv(tmp_path / 'r.csv', rows),
           _write_jsonl(tmp_path / 'r.jsonl', rows),
           str(tmp_path / 'r.parquet')]
  pq.write_table(pa.Table.from_pylist(rows), paths[2], row_group_size=7)
  got = []
  for path in paths:
    data = _data(path, tmp_path, validation_fraction=0.2, test_fraction=0.2)
    assert data.labels() == ('mixed', 'neg', 'pos')
    got.append({s: list(data.source(s)) for s in file_splits.SPLITS})
  assert got[0] == got[1] == got[2]
  assert sum(len(v) for v in got[0].values()) == 40
  assert got[0]['train'][0] == {'text': rows[0]['review'], 'label': 0}


def test_int_labels_keep_their_values_and_pairs_keep_both_texts(tmp_path):
  rows = [{'a': f'first {i}', 'b': f'second {i}', 'y': i % 4}
          for i in range(20)]
  data = _data(_write_jsonl(tmp_path / 'p.jsonl', rows), tmp_path,
               fields=files.Fields('a', text_pair='b', label='y'),
               validation_fraction=0, test_fraction=0.25)
  assert data.labels() == ('0', '1', '2', '3')
  row = data.source('train')[0]
  assert row['label'] == int(row['text'].split()[1]) % 4
  assert row['text_pair'] == 'second ' + row['text'].split()[1]
  assert len(data.source('validation')) == 0


def test_a_glob_reads_every_file_in_order_and_a_converted_file_is_cached(
    tmp_path):
  rows = _rows(30)
  _write_jsonl(tmp_path / 'part0.jsonl', rows[:10])
  _write_jsonl(tmp_path / 'part1.jsonl', rows[10:])
  fields = files.Fields('review', label='sentiment')
  paths = files.resolve_paths(str(tmp_path / 'part*.jsonl'))
  first = files.convert(paths, '', fields, cache_root=tmp_path / 'c')
  assert [first[i]['text'] for i in range(30)] == [r['review'] for r in rows]
  stamp = os.path.getmtime(os.path.join(first.folder, 'rows.array_record'))
  again = files.convert(paths, '', fields, cache_root=tmp_path / 'c')
  assert again.folder == first.folder
  assert os.path.getmtime(
      os.path.join(again.folder, 'rows.array_record')) == stamp
  _write_jsonl(tmp_path / 'part1.jsonl', rows[10:25])   # New content.
  changed = files.convert(paths, '', fields, cache_root=tmp_path / 'c')
  assert changed.folder != first.folder and len(changed) == 25


# ---- splits -----------------------------------------------------------------


def test_seeded_grouped_split_puts_each_group_in_one_split(tmp_path):
  rows = _rows(150)
  path = _write_csv(tmp_path / 'g.csv', rows)
  fields = files.Fields('review', label='sentiment', group='movie')
  movie = {r['review']: r['movie'] for r in rows}

  def groups(seed):
    data = _data(path, tmp_path, fields=fields, split_seed=seed,
                 validation_fraction=0.2, test_fraction=0.2)
    return {s: {movie[r['text']] for r in data.source(s)}
            for s in file_splits.SPLITS}

  g = groups(0)
  assert not g['train'] & g['validation'] and not g['train'] & g['test']
  assert not g['validation'] & g['test']
  assert (len(g['train']), len(g['validation']), len(g['test'])) == (18, 6, 6)
  assert groups(0) == g                        # The seed fixes the split,
  assert groups(1)['test'] != g['test']        # and another seed moves it.


def test_own_validation_file_and_split_slices(tmp_path):
  rows = _rows(60)
  data = _data(_write_csv(tmp_path / 't.csv', rows), tmp_path,
               validation_path=_write_csv(tmp_path / 'v.csv', rows[:9]),
               test_fraction=0.5)
  assert len(data.source('validation')) == 9
  assert len(data.source('train')) == len(data.source('test')) == 30
  assert len(data.source('train[:10]')) == 10
  assert len(data.source('test[50%:]')) == 15
  with pytest.raises(ValueError, match='train'):
    data.source('dev')


# ---- bad rows ---------------------------------------------------------------


def _bad_file(tmp_path, case):
  """(path, line, expected message) of a file whose one bad row is ``case``."""
  rows = _rows(20)
  if case == 'missing field':
    rows[4] = {'review': rows[4]['review']}
    return _write_jsonl(tmp_path / 'b.jsonl', rows), 5, "missing field 'sentiment'"
  if case == 'empty text':
    rows[6]['review'] = '  '
    return _write_csv(tmp_path / 'b.csv', rows), 8, 'empty text'
  if case == 'undecodable bytes':
    path = _write_csv(tmp_path / 'b.csv', rows)
    data = open(path, 'rb').read().splitlines(keepends=True)
    data[3] = b'caf\xe9 \xff film,pos,movie1\n'
    open(path, 'wb').write(b''.join(data))
    return path, 4, 'undecodable bytes'
  if case == 'unknown label':
    rows[2]['sentiment'] = 'sarcastic'
    return _write_jsonl(tmp_path / 'b.jsonl', rows), 3, "unknown label 'sarcastic'"
  raise AssertionError(case)


@pytest.mark.parametrize('case', ['missing field', 'empty text',
                                  'undecodable bytes', 'unknown label'])
def test_a_bad_row_names_file_and_line_or_is_skipped_and_counted(tmp_path,
                                                                  case):
  path, line, message = _bad_file(tmp_path, case)
  names = ('mixed', 'neg', 'pos')   # 'unknown label': the classes are fixed.
  strict = _data(path, tmp_path, label_names=names, validation_fraction=0,
                 test_fraction=0.1)
  with pytest.raises(ValueError) as e:
    strict.source('train')
  assert f'{path}:{line}: {message}' in str(e.value)
  skip = _data(path, tmp_path, label_names=names, validation_fraction=0,
               test_fraction=0.1, skip_bad_rows=True)
  train_rows, test_rows = skip.source('train'), skip.source('test')
  assert len(train_rows) + len(test_rows) == 19
  assert sum(train_rows.skipped.values()) == 1
  assert case.split()[0] in next(iter(train_rows.skipped))


def test_a_missing_column_is_an_error_before_any_row(tmp_path):
  path = _write_csv(tmp_path / 'c.csv', _rows(5))
  data = _data(path, tmp_path, fields=files.Fields('text', label='sentiment'))
  with pytest.raises(ValueError, match=r"c.csv:1: no column 'text'"):
    data.source('train')


# ---- a run on a file, then evaluate / export from its workdir ---------------


@pytest.fixture(scope='module')
def csv_run(tmp_path_factory):
  """The MiniLM smoke config on a 3-class CSV with string labels."""
  tmp = tmp_path_factory.mktemp('csv_run')
  path = _write_csv(tmp / 'reviews.csv', _rows(150))
  config = load_config('rt_minilm_lora', **{
      'data.path': path, 'data.text_field': 'review',
      'data.label_field': 'sentiment', 'data.group_field': 'movie',
      'data.validation_fraction': 0.2, 'data.test_fraction': 0.2})
  workdir = tmp / 'run'
  return config, train.train_and_evaluate(config, str(workdir)), workdir


def test_three_class_csv_trains_a_three_way_head(csv_run):
  config, summary, workdir = csv_run
  assert summary['labels'] == ['mixed', 'neg', 'pos']
  assert np.isfinite(summary['test']['loss'])
  _, meta = ckpt_lib.read_meta(workdir / 'checkpoints')
  assert meta['shapes']['params/classifier/kernel'][0][-1] == 3
  assert meta['model']['labels'] == ['mixed', 'neg', 'pos']
  saved = saved_run.run_config(str(workdir))
  assert saved.data.path == config.data.path
  assert saved.data.text_field == 'review' and saved.name == config.name


def _cli(*args):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_evaluate_and_export_clis_need_only_the_workdir(csv_run, tmp_path):
  _, summary, workdir = csv_run
  out = _cli('lorajax.cli.evaluate', f'--workdir={workdir}', '--step=best')
  got = json.loads(out.strip().splitlines()[-1])
  assert got['accuracy'] == pytest.approx(summary['test']['accuracy'])
  assert got['loss'] == pytest.approx(summary['test']['loss'], rel=1e-5)
  _cli('lorajax.cli.export', f'--workdir={workdir}', '--format=merged',
       f'--out={tmp_path / "merged"}')
  hf = json.loads((tmp_path / 'merged' / 'config.json').read_text())
  assert hf['id2label'] == {'0': 'mixed', '1': 'neg', '2': 'pos'}
  assert digests.verify(tmp_path / 'merged')   # Named, then sealed again.
  assert hf['label2id']['pos'] == 2
