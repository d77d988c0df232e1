"""Deterministic, resumable, host-sharded batches over random-access data.

The index arithmetic is grain's: a ``grain.MapDataset`` shuffles each epoch
with its own seed (``seed + epoch`` inside grain; the user seed is first mixed
through ``numpy.random.SeedSequence`` so that seeds 0 and 1 do not share
epochs), batches each epoch separately and drops its remainder, and is sliced
so that process ``p`` of ``P`` reads the ``p``-th slice of every global batch.
Because a ``MapDataset`` is random access, batch ``k`` is ``dataset[k]``: the
iterator's whole position is the step, stored as the small JSON-able dict
``{'epoch': e, 'index': i, 'seed': s}`` (``i`` batches into epoch ``e``).

Example:

  >>> arrays = {'x': np.arange(10), 'y': np.arange(10) % 2}
  >>> it = BatchIterator(arrays, batch_size=4, seed=0)
  >>> batch = next(it)                 # dict of [4, ...] numpy arrays
  >>> batch['x'].shape
  (4,)
  >>> state = it.get_state()
  >>> state
  {'epoch': 0, 'index': 1, 'seed': 0}
  >>> again = BatchIterator(arrays, batch_size=4, seed=0)
  >>> again.set_state(state)
  >>> bool((next(again)['x'] == next(it)['x']).all())  # The same batch 2.
  True
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

Batch = dict[str, np.ndarray]


class ArraySource:
  """A random-access source over a dict of arrays with one leading dim."""

  def __init__(self, arrays: Mapping[str, Any]):
    if not arrays:
      raise ValueError('arrays is empty')
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: v.shape[0] if v.ndim else None
               for k, v in self._arrays.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
      raise ValueError(f'arrays need one leading dimension; got lengths '
                       f'{lengths}')
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}


class _PadTo:
  """Maps an index to an example with ``valid``; past the end, a zero example."""

  def __init__(self, source: Any, template: dict[str, Any]):
    self._source = source
    self._len = len(source)
    self._pad = {k: np.zeros_like(np.asarray(v)) for k, v in template.items()}
    self._pad['valid'] = np.asarray(False)

  def __call__(self, index: int) -> dict[str, Any]:
    if index < self._len:
      return dict(self._source[index], valid=np.asarray(True))
    return dict(self._pad)


def _stack(examples: Sequence[dict[str, Any]]) -> Batch:
  return {k: np.stack([np.asarray(e[k]) for e in examples])
          for k in examples[0]}


def _grain_seed(seed: int) -> int:
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


class BatchIterator(Iterator[Batch]):
  """Batches over an in-memory dict of arrays or a random-access source.

  Training (``train=True``): each epoch is a fresh permutation derived from
  ``(seed, epoch)``, cut into ``len // batch_size`` full batches (the
  remainder of each epoch is dropped); epochs repeat ``num_epochs`` times
  (None: forever). Evaluation (``train=False``): one ordered pass; the last
  batch is partial, or padded to full size with ``valid`` False when
  ``pad_last`` (required when ``process_count > 1``, so that every process
  runs the same number of steps).

  Attributes:
    batch_size: the global batch size.
    local_batch_size: rows this process gets per batch.
    steps_per_epoch: batches per epoch.
  """

  def __init__(self, data: Mapping[str, Any] | Any, *, batch_size: int,
               seed: int = 0, train: bool = True, shuffle: bool | None = None,
               num_epochs: int | None = None, pad_last: bool = False,
               map_fn: Callable[[Any], dict[str, Any]] | None = None,
               process_index: int | None = None,
               process_count: int | None = None):
    """Sets up the iterator at epoch 0, step 0.

    Args:
      data: a dict of arrays [N, ...] (e.g. ``encode_classification``'s) or a
        random-access source (``len`` and ``[i]`` returning dicts).
      batch_size: global batch size, divisible by ``process_count``.
      seed: shuffle seed, a non-negative int.
      train: training (shuffled, repeating, full batches) or evaluation.
      shuffle: defaults to ``train``.
      num_epochs: training epochs before StopIteration; None for no end.
      pad_last: in evaluation, pad the last batch and add a bool ``valid``.
      map_fn: applied to each example as it is read (e.g. to tokenize).
      process_index: this host; ``jax.process_index()`` when None.
      process_count: number of hosts; ``jax.process_count()`` when None.

    Raises:
      ValueError: for a bad batch size, seed, process index or a dataset too
        small for one training batch.
    """
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = (jax.process_index() if process_index is None
                       else process_index)
      process_count = (jax.process_count() if process_count is None
                       else process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in '
                       f'[0, {process_count})')
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} must be a positive multiple '
                       f'of process_count {process_count}')
    if not 0 <= seed < 2**63:
      raise ValueError(f'seed must be a non-negative int, got {seed}')
    if not train and process_count > 1 and not pad_last:
      raise ValueError('sharded evaluation needs pad_last=True so that every '
                       'process sees the same number of batches')
    source = ArraySource(data) if isinstance(data, Mapping) else data
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed = int(seed)
    self.train = train
    self.num_epochs = num_epochs
    self._process = (process_index, process_count)
    n = len(source)
    ds = grain.MapDataset.source(source)
    if map_fn is not None:
      ds = ds.map(map_fn)
    if shuffle if shuffle is not None else train:
      ds = ds.shuffle(seed=_grain_seed(self.seed))
    if train:
      self.steps_per_epoch = n // batch_size
      if not self.steps_per_epoch:
        raise ValueError(f'{n} examples are fewer than one batch of '
                         f'{batch_size}')
    else:
      self.steps_per_epoch = -(-n // batch_size)
      if pad_last and n:
        ds = grain.MapDataset.range(self.steps_per_epoch * batch_size).map(
            _PadTo(ds, ds[0]))
    # Cut each epoch into per-process pieces of one global batch, keep whole
    # global batches only, and give process p every P-th piece, starting at p.
    ds = ds.batch(self.local_batch_size, drop_remainder=train,
                  batch_fn=_stack)
    if process_count > 1:
      ds = ds[:self.steps_per_epoch * process_count]
      ds = ds[process_index::process_count]
    self._dataset = ds.repeat(num_epochs) if train else ds
    self._step = 0

  @property
  def dataset(self) -> grain.MapDataset:
    """The grain ``MapDataset`` of batches, for grain's own iterators."""
    return self._dataset

  @property
  def step(self) -> int:
    """Batches produced since epoch 0, step 0."""
    return self._step

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    epochs = self.num_epochs if self.train else 1
    if epochs is not None and self._step >= epochs * self.steps_per_epoch:
      raise StopIteration
    batch = self._dataset[self._step]
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """The position: ``{'epoch': e, 'index': i, 'seed': s}``, JSON-able."""
    epoch, index = divmod(self._step, self.steps_per_epoch)
    return {'epoch': int(epoch), 'index': int(index), 'seed': self.seed}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position saved by ``get_state``.

    Args:
      state: a dict with ``epoch``, ``index`` and ``seed``.

    Raises:
      ValueError: if the seed is not this iterator's (the order would differ)
        or the index is outside an epoch.
    """
    missing = {'epoch', 'index', 'seed'} - set(state)
    if missing:
      raise ValueError(f'state {dict(state)} lacks {sorted(missing)}')
    if int(state['seed']) != self.seed:
      raise ValueError(f'state has seed {state["seed"]} but this iterator has '
                       f'seed {self.seed}; build it with seed='
                       f'{state["seed"]} to resume')
    epoch, index = int(state['epoch']), int(state['index'])
    if epoch < 0 or not 0 <= index < self.steps_per_epoch:
      raise ValueError(f'state epoch {epoch} index {index} is outside '
                       f'{self.steps_per_epoch} steps per epoch')
    self._step = epoch * self.steps_per_epoch + index
