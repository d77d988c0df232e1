r"""Builds the offline datasets if needed and prints what is in them.

Run:

  python -m experiments.bench.data_report [--data_dir=DIR]

Per dataset and split: examples, label balance (classification), distinct
movies / plays, and lengths: MiniLM WordPiece tokens (with [CLS] and [SEP])
for Rotten Tomatoes, whitespace words for Shakespeare. Catalog datasets
(``imdb_reviews``, ``glue/sst2``) are listed when prepared in ``--data_dir``.
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds
import tokenizers

from lorajax import assets
from lorajax.data import builders
from lorajax.data import sources
from lorajax.data import text

_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data dir; default $LORAJAX_DATA_DIR or '
    '~/.cache/lorajax/tensorflow_datasets.')

_HEADER = ('dataset', 'split', 'examples', 'labels 0/1', 'frac 1', 'groups',
           'length unit', 'median', 'p95', 'max', 'total')


def _lengths_row(lengths: np.ndarray) -> tuple[str, ...]:
  if not lengths.size:
    return ('-',) * 4
  return (f'{np.median(lengths):.0f}', f'{np.percentile(lengths, 95):.0f}',
          f'{lengths.max()}', f'{lengths.sum():,}')


def _rows(name: str, split: str, data_dir: str | None,
          tokenizer: tokenizers.Tokenizer) -> tuple[str, ...]:
  """One table row for one split."""
  source = sources.get_source(name, split, data_dir)
  examples = source[:]
  spec = sources.get_spec(name)
  texts = [e['text'] for e in examples]
  if spec.task == 'classification':
    labels = np.array([e['label'] for e in examples])
    balance = f'{(labels == 0).sum()}/{(labels == 1).sum()}'
    frac = f'{(labels == 1).mean():.3f}' if labels.size else '-'
    ids, _ = text.tokenize(texts, tokenizer)
    lengths, unit = np.array([len(s) for s in ids]), 'minilm tokens'
  else:
    balance, frac = '-', '-'
    lengths, unit = np.array([len(t.split()) for t in texts]), 'words'
  group_key = {'rotten_tomatoes': 'movie', 'shakespeare': 'play'}.get(name)
  groups = (str(len({e[group_key] for e in examples})) if group_key
            else '-')
  return (name, split, f'{len(examples):,}', balance, frac, groups, unit,
          *_lengths_row(lengths))


def _print_table(rows: list[tuple[str, ...]]) -> None:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for j, row in enumerate(rows):
    print('  '.join(c.ljust(w) if i < 2 or i == 6 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths))))
    if j == 0:
      print('  '.join('-' * w for w in widths))


def main(argv: Sequence[str]) -> None:
  del argv
  tfds.disable_progress_bar()
  data_dir = _DATA_DIR.value or builders.default_data_dir()
  for name in builders.BUILDERS:
    start = time.perf_counter()
    builders.prepare(name, data_dir)
    print(f'{name}: ready in {data_dir} ({time.perf_counter() - start:.2f} s)')
  tokenizer = tokenizers.Tokenizer.from_file(
      str(assets.asset_path('minilm', 'model/tokenizer.json')))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  rows = [_HEADER]
  for name in builders.BUILDERS:
    for split in builders.SPLITS:
      rows.append(_rows(name, split, data_dir, tokenizer))
  for name, splits in (('imdb_reviews', ('train', 'test')),
                       ('glue/sst2', ('train', 'validation'))):
    try:
      for split in splits:
        rows.append(_rows(name, split, _DATA_DIR.value, tokenizer))
    except ValueError as e:
      logging.info('%s', e)
      print(f'{name}: not prepared (see lorajax.data.sources.get_source)')
  print()
  _print_table(rows)


if __name__ == '__main__':
  app.run(main)
