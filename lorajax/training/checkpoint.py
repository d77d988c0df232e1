"""Orbax checkpoints of a run: what is trained, never the frozen base.

Layout of ``<workdir>/checkpoints/<step>/`` (one Orbax ``CheckpointManager``
step, written with ``ocp.args.Composite``)::

  trainable/  StandardSave  {'adapters': ..., 'params': ...}   (the adapter)
  opt/        StandardSave  {'opt_state': ..., 'step': int32, 'rng': uint32[2]}
  meta/       JsonSave      {'step', 'data_state', 'spec', 'model', 'shapes',
                             'config', 'lorajax_version'}
  lorajax_manifest.json     size and sha256 of every file above, written
                            last (``integrity``; ``seal_finished``)

``meta['spec']`` is the spec as ``lorajax.io.spec_json`` writes it (the same
JSON adapter files carry), built by ``make_meta``.

The best validation step's adapter is kept apart, in
``<workdir>/best_checkpoint/<step>/`` (``trainable/`` and ``meta/`` only;
``save_best``), out of reach of ``max_to_keep``: Orbax's own
``best_fn``/``best_mode`` would rank the resume checkpoints by the metric, so
the newest one (what a killed run resumes from) could be the one removed,
and steps saved between validations (no metric) would be kept forever or
dropped. A separate folder keeps "resume" and "best" apart at the cost of
one adapter-sized write per improvement; ``keep_only`` prunes it when the
run resumes (to the best step its checkpoint records) and when it ends.

``restore_latest`` takes the newest step whose files match its manifest;
a damaged one is named, moved to ``<workdir>/damaged_checkpoints`` and
passed over for the next older one.

``trainable/`` alone is what ships: ``restore_trainable`` puts it back onto a
base for evaluation. A save killed half-way leaves a
``<step>.orbax-checkpoint-tmp`` folder that the manager neither lists nor
restores (and removes when it next opens the folder).

Example:

  >>> import tempfile, optax
  >>> trainable = {'adapters': {}, 'params': {'w': np.ones(3, np.float32)}}
  >>> state = step_lib.create_state(trainable, optax.adam(1e-3), seed=0)
  >>> meta = {'shapes': tree_shapes(trainable), 'model': {}, 'spec': {}}
  >>> manager = make_manager(tempfile.mkdtemp(), async_save=False)
  >>> save(manager, state, meta)
  >>> restored, stored = restore_latest(manager, state, meta)
  >>> restored.trainable['params']['w'].tolist(), stored['step']
  ([1.0, 1.0, 1.0], 0)
  >>> manager.close()
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from lorajax import spec as spec_lib
from lorajax import adapters as adapters_lib
from lorajax.io import spec_json
from lorajax.training import integrity
from lorajax.training import step as step_lib

PyTree = Any
ITEMS = ('trainable', 'opt', 'meta')
BEST_DIR = 'best_checkpoint'   # <workdir>/best_checkpoint/<step>/


def make_manager(directory: str | os.PathLike[str], *,
                 max_to_keep: int | None = 2,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` over ``directory`` (created if missing);
  ``max_to_keep=None`` keeps every step."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
      create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                               options=options, item_names=ITEMS)


def tree_shapes(tree: PyTree) -> dict[str, list[Any]]:
  """``{path: [shape, dtype]}`` of every leaf, JSON-able."""
  return {path: [list(np.shape(x)), str(x.dtype)]
          for path, x in spec_lib.flatten_paths(tree)}


def make_meta(spec: spec_lib.LoraSpec, model_info: dict[str, Any],
              trainable: PyTree, **extra: Any) -> dict[str, Any]:
  """The ``meta`` a checkpoint is written with and checked against.

  Args:
    spec: the run's spec, stored as ``spec_json.spec_to_json`` writes it.
    model_info: JSON-able description of the base model.
    trainable: the trainable tree (arrays or ``ShapeDtypeStruct``s).
    **extra: more JSON-able fields (the config, the version).
  """
  # Through JSON text, so that it compares equal to what a restore reads.
  layouts = {p: layout.to_json()
             for p, layout in adapters_lib.layouts(trainable).items()}
  return {'spec': json.loads(json.dumps(spec_json.spec_to_json(spec))),
          'model': json.loads(json.dumps(model_info, default=str)),
          'shapes': tree_shapes(trainable), 'layouts': layouts, **extra}


def _spec_difference(have: Any, want: Any) -> str:
  """Says which rule of two spec JSONs differs first."""
  if not isinstance(have, dict) or 'rules' not in have:
    return (f'{str(have)[:200]}, which is not spec JSON (an older lorajax '
            'wrote it)')
  rules_have = have['rules']
  rules_want = want.get('rules', []) if isinstance(want, dict) else want
  for i, (a, b) in enumerate(zip(rules_have, rules_want)):
    if a != b:
      return f'rule {i} is {a} (this run: {b})'
  return f'{len(rules_have)} rules (this run: {len(rules_want)})'


def save(manager: ocp.CheckpointManager, state: step_lib.TrainState,
         meta: dict[str, Any]) -> None:
  """Starts saving ``state`` and ``meta`` as step ``state.step`` (async)."""
  step = int(jax.device_get(state.step))
  opt = {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}
  # Orbax waits for the previous save before starting one anyway: seal it
  # first, so that only the newest step can ever be unsealed.
  wait_until_finished(manager)
  seal_finished(manager)
  try:
    manager.save(step, force=True, args=ocp.args.Composite(
        trainable=ocp.args.StandardSave(state.trainable),
        opt=ocp.args.StandardSave(opt),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
  except Exception as e:  # pylint: disable=broad-except
    raise _failed(e, manager, step) from e
  seal_finished(manager)   # At once when the save was synchronous.


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Waits for an asynchronous save; a write it failed (a full disk) is
  raised as ``integrity.WriteFailed`` naming the file."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _failed(e, manager, None) from e


def _failed(error: Exception, manager: ocp.CheckpointManager,
            step: int | None) -> Exception:
  """``integrity.write_failure`` of a failed save, else ``error`` itself.

  Orbax raises the first of a save's failed writes while its other writer
  threads may still run; they are waited for here, so that none of them
  outlives the error and fails again at interpreter shutdown, after the
  message that names the file.
  """
  _join_writers(_WRITER_GRACE_S)
  return integrity.write_failure(error, manager.directory, step) or error


_WRITER_GRACE_S = 60.0


def _join_writers(seconds: float) -> None:
  """Joins Orbax's live background threads, ``seconds`` at most in all."""
  deadline = time.monotonic() + seconds
  me = threading.current_thread()
  for thread in threading.enumerate():
    if thread is me or not type(thread).__module__.startswith('orbax.'):
      continue
    thread.join(max(0.0, deadline - time.monotonic()))


def save_best(manager: ocp.CheckpointManager, trainable: PyTree,
              meta: dict[str, Any], step: int) -> None:
  """Writes ``trainable`` and ``meta`` as step ``step`` of the best folder.

  A step already there (written before a kill, recomputed after the
  resume) is replaced. Synchronous: the best step is on disk before any
  resume checkpoint that records it.

  Args:
    manager: ``make_manager(<workdir>/best_checkpoint, max_to_keep=None,
      async_save=False)``.
    trainable: the trainable tree at the best validation step.
    meta: the run's meta.
    step: the step of that validation.
  """
  if step in manager.all_steps():
    manager.delete(step)
  try:
    manager.save(step, force=True, args=ocp.args.Composite(
        trainable=ocp.args.StandardSave(trainable),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
  except Exception as e:  # pylint: disable=broad-except
    raise _failed(e, manager, step) from e
  wait_until_finished(manager)
  seal_finished(manager)


def keep_only(manager: ocp.CheckpointManager, step: int | None) -> None:
  """Deletes every step of ``manager`` but ``step`` (all of them for None)."""
  for other in manager.all_steps():
    if other != step:
      manager.delete(other)


def abstract(tree: PyTree) -> PyTree:
  """``ShapeDtypeStruct`` leaves that keep each array's sharding."""
  def leaf(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                sharding=getattr(x, 'sharding', None))
  return jax.tree.map(leaf, tree)


def check_compatible(stored: dict[str, Any], expected: dict[str, Any],
                     where: str) -> None:
  """Raises ValueError when a checkpoint's trainable tree or model differs.

  Args:
    stored: the checkpoint's ``meta``.
    expected: this run's ``meta`` (``shapes``, ``model``, ``spec``).
    where: the checkpoint folder, for the message.

  Raises:
    ValueError: naming the first mismatching path and both shapes, or the
      differing model fields, or the differing spec rules.
  """
  have, want = stored.get('shapes', {}), expected['shapes']
  hint = (f'; the checkpoint was written with spec {stored.get("spec")} and '
          f'model {stored.get("model", {}).get("name")!r}. Use a fresh '
          f'--workdir or the config that wrote it')
  for path in sorted(set(have) | set(want)):
    if path not in have:
      raise ValueError(f'checkpoint {where} has no trainable leaf {path} '
                       f'(this run expects shape {tuple(want[path][0])})'
                       + hint)
    if path not in want:
      raise ValueError(f'checkpoint {where} has trainable leaf {path} of '
                       f'shape {tuple(have[path][0])}, which this run does '
                       f'not train' + hint)
    if have[path][0] != want[path][0]:
      raise ValueError(f'checkpoint {where}: {path} has shape '
                       f'{tuple(have[path][0])}, this run expects '
                       f'{tuple(want[path][0])}' + hint)
  model_have, model_want = stored.get('model', {}), expected['model']
  diff = sorted(k for k in set(model_have) | set(model_want)
                if model_have.get(k) != model_want.get(k))
  if diff:
    raise ValueError(
        f'checkpoint {where} is for another model: ' + ', '.join(
            f'{k}={model_have.get(k)!r} (this run: {model_want.get(k)!r})'
            for k in diff[:8]))
  layouts_have = stored.get('layouts')
  # A caller that passes no layouts (meta of an older lorajax) checks none.
  if (layouts_have is not None and 'layouts' in expected
      and layouts_have != expected['layouts']):
    path = next(p for p in sorted(set(layouts_have)
                                  | set(expected.get('layouts', {})))
                if layouts_have.get(p) != expected['layouts'].get(p))
    raise ValueError(
        f'checkpoint {where}: the adapter of {path} was trained for kernel '
        f'layout {layouts_have.get(path)}, this run\'s function uses '
        f'{expected["layouts"].get(path)}' + hint)
  if stored.get('spec') != expected['spec']:
    raise ValueError(f'checkpoint {where} was written with another spec: '
                     f'{_spec_difference(stored.get("spec"), expected["spec"])}'
                     '. Use a fresh --workdir or the config that wrote it')


def seal_finished(manager: ocp.CheckpointManager) -> list[int]:
  """Seals (``integrity.seal``) every finished step that has no manifest.

  Called after each training step and at the end of a run: a save runs in
  the background, and its manifest can be written only once Orbax has
  renamed it into place. Returns the steps sealed (none while a save is in
  progress, and none on a process other than 0).
  """
  if manager.is_saving_in_progress() or jax.process_index() != 0:
    return []
  sealed = []
  for step in manager.all_steps():
    folder = os.path.join(str(manager.directory), str(step))
    if os.path.isdir(folder) and not integrity.is_sealed(folder):
      try:
        integrity.seal(folder)
      except OSError as e:   # A full disk, most often.
        raise OSError(e.errno, (
            f'cannot write the manifest of checkpoint {folder} '
            f'({e.strerror or e}); a rerun passes over that step and resumes '
            'from the newest sealed one. Free space and rerun the same '
            'command')) from e
      sealed.append(step)
  return sealed


def _read_step_meta(manager: ocp.CheckpointManager, step: int
                    ) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']


def restore_latest(manager: ocp.CheckpointManager,
                   target: step_lib.TrainState, expected: dict[str, Any],
                   *, check_meta: Callable[[dict[str, Any], str], None]
                   | None = None,
                   note: Callable[[str], None] = logging.warning,
                   ) -> tuple[step_lib.TrainState | None, dict[str, Any] | None]:
  """Restores the newest intact checkpoint, if there is one.

  Every step folder is checked against its manifest (``integrity.verify``),
  newest first. One that is damaged or was never sealed is reported through
  ``note`` (which files, how) and moved to ``<workdir>/damaged_checkpoints``;
  the next older one is tried. Entries of the folder that are not steps are
  left alone, with a note. A folder written before checkpoints were sealed
  (no step has a manifest) is restored as it is, newest first, and a step
  Orbax cannot read is reported and moved aside the same way.

  Args:
    manager: from ``make_manager``.
    target: a ``TrainState`` (arrays or ``ShapeDtypeStruct``s) giving the
      structure, dtypes and shardings to restore into.
    expected: this run's meta, checked with ``check_compatible`` first.
    check_meta: called as ``check_meta(meta, where)`` before any array is
      read (e.g. the run-defining config fields); raises to refuse.
    note: receives each sentence about a skipped or ignored entry.

  Returns:
    ``(state, meta)``, or ``(None, None)`` when the folder has no intact
    checkpoint.

  Raises:
    ValueError: if the checkpoint does not fit this run.
  """
  directory = str(manager.directory)
  steps, unknown = integrity.scan(directory)
  for name in unknown:
    note(f'{os.path.join(directory, name)} is not a checkpoint step; '
         'ignored')
  legacy = bool(steps) and not any(
      integrity.is_sealed(os.path.join(directory, str(s))) for s in steps)
  if legacy:
    note(f'no checkpoint in {directory} has a manifest (written by an older '
         'lorajax): restoring without verifying the files')
  target = abstract(target)
  opt_target = {'opt_state': target.opt_state, 'step': target.step,
                'rng': target.rng}
  for step in steps:
    where = os.path.join(directory, str(step))
    problem = None if legacy else integrity.verify(where)
    if problem is None:
      manager.reload()
      try:
        meta = _read_step_meta(manager, step)
        check_compatible(meta, expected, where)
        if check_meta is not None:
          check_meta(meta, where)
        try:
          out = manager.restore(step, args=ocp.args.Composite(
              trainable=ocp.args.StandardRestore(target.trainable),
              opt=ocp.args.StandardRestore(opt_target)))
        except ValueError as e:
          raise ValueError(
              f'checkpoint {where} does not fit this run\'s state: '
              f'{" ".join(str(e).split())[:400]}. The optimizer state has '
              'another structure when an optimizer field that adds or '
              'removes a transformation changed (e.g. clipping turned on or '
              'off); resume with the config that wrote it or use a fresh '
              '--workdir') from None
      except ValueError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not legacy:
          raise
        problem = f'Orbax cannot read it ({type(e).__name__}: {str(e)[:300]})'
    if problem is None:
      opt = out['opt']
      state = step_lib.TrainState(step=opt['step'], trainable=out['trainable'],
                                  opt_state=opt['opt_state'], rng=opt['rng'])
      return state, meta
    moved = integrity.quarantine(where) if jax.process_index() == 0 else where
    note(f'checkpoint {where} is damaged: {problem}. Moved to {moved}; '
         'trying the next older checkpoint')
  manager.reload()
  if steps:
    note(f'no intact checkpoint left in {directory}: the run starts from '
         'step 0')
  return None, None


def read_meta(directory: str | os.PathLike[str], step: int | None = None
              ) -> tuple[int, dict[str, Any]]:
  """``(step, meta)`` of a checkpoint folder's latest (or given) step.

  Raises:
    FileNotFoundError: if the folder holds no complete checkpoint.
    ValueError: naming the files of that step that differ from its
      manifest.
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(os.fspath(directory)), item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no complete checkpoint in {directory}')
  where = os.path.join(os.fspath(directory), str(step))
  if integrity.is_sealed(where) and (problem := integrity.verify(where)):
    manager.close()
    raise ValueError(f'checkpoint {where} is damaged: {problem}')
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  manager.close()
  return step, meta


def restore_trainable(directory: str | os.PathLike[str], target: PyTree,
                      expected: dict[str, Any], step: int | None = None
                      ) -> tuple[PyTree, dict[str, Any]]:
  """Restores only ``trainable/`` (no optimizer state), e.g. for evaluation.

  Args:
    directory: the checkpoints folder.
    target: the trainable tree (arrays or ``ShapeDtypeStruct``s).
    expected: meta with ``shapes``, ``model`` and ``spec`` to check against.
    step: the step; None takes the latest complete one.

  Returns:
    ``(trainable, meta)``.
  """
  step, meta = read_meta(directory, step)   # Verified against its manifest.
  where = os.path.join(os.fspath(directory), str(step))
  check_compatible(meta, expected, where)
  manager = ocp.CheckpointManager(
      os.path.abspath(os.fspath(directory)), item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True))
  out = manager.restore(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardRestore(abstract(target))))
  manager.close()
  return out['trainable'], meta


def item_size(directory: str | os.PathLike[str], step: int,
              item: str = 'trainable') -> int:
  """Bytes on disk of one item of one checkpoint step."""
  root = os.path.join(os.fspath(directory), str(step), item)
  total = 0
  for folder, _, files in os.walk(root):
    total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  return total
