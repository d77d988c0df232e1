"""``train_and_evaluate(config, workdir)``: a whole run, resumable.

The run builds the task (model, attached method, data), restores the
newest complete checkpoint in ``<workdir>/checkpoints`` if there is one,
trains ``config.num_train_steps`` steps with periodic validation and
checkpoints, evaluates on test, and returns (and prints) a summary.

Each validation that beats the best so far writes that adapter to
``<workdir>/best_checkpoint/<step>`` (``checkpoint.save_best``); the
reported ``test`` is that checkpoint's score (``test_step`` its step), and
``test_final`` the last step's, so that a run that overfits late is scored
where validation chose, as a paper reports it.

The terminal shows the setup (the trainable report), one progress display,
the evaluations and the summary, last; library INFO logging goes to
``<workdir>/info.log`` (``lorajax.training.console``).

``lorajax.training.finished`` puts a saved adapter back on its model without
the training data (``evaluate_checkpoint`` loads only the split it scores,
``export_checkpoint`` none).

A run killed at any point and started again with the same config and
workdir continues from its last checkpoint: the trainable tree, optimizer
state, step, RNG and data position are restored, so it computes the same
losses and the same final adapters as a run never interrupted. A NaN or inf
loss stops the run with ``FloatingPointError`` before anything of that step
is saved.

Before anything runs the config is checked (``validate.check_config``: every
invalid field listed) and the workdir locked (``workdir_lock``: a second
run there refuses, naming the first). A resume restores the newest
checkpoint whose files match its manifest (``integrity``) and refuses a
config whose run-defining fields changed unless
``config.allow_config_change``. SIGTERM or Ctrl-C finishes the step under
way, checkpoints it and exits with status 143 / 130 (``signals``).

With ``config.steps_per_call = k`` the steps run k to a compiled call
(``step.scan_steps``); a call ends early at each evaluation and checkpoint
step, so those and the metrics rows fall on the same steps as with one step
a call. A signal is then answered after the call under way, and a
non-finite loss names its step and keeps nothing of that call.

Example:

  >>> summary = train_and_evaluate(config, '/tmp/run')  # doctest: +SKIP
  >>> summary['test']['accuracy']  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

import lorajax
from lorajax.data import loader
from lorajax.methods import adalora_allocator
from lorajax.runtime import memory
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import console
from lorajax.training import finished
from lorajax.training import metrics as metrics_lib
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import signals
from lorajax.training import step as step_lib
from lorajax.training import tasks
from lorajax.training import validate as validate_lib
from lorajax.training import workdir_lock

PyTree = Any


Runner = parallel.Runner


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` and checks a file can be written there.

  Raises:
    ValueError: naming the folder and the OS error, if it cannot.
  """
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  probe = os.path.join(workdir, f'.write_probe_{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} is not writable ({type(e).__name__}:'
                     f' {e.strerror or e}); pass a --workdir you can write '
                     'to') from e
  return workdir


def _test_set(arrays: dict[str, np.ndarray], eval_kw: dict[str, Any]
              ) -> dict[str, Any]:
  """``test_examples`` scored and their ``test_majority_rate`` (labels)."""
  n = finished.rows(arrays)
  if eval_kw.get('max_batches') is not None:
    n = min(n, eval_kw['max_batches'] * eval_kw['batch_size'])
  rate = None
  if 'label' in arrays and n:
    rate = float(np.bincount(np.asarray(arrays['label'][:n])).max() / n)
  return {'test_examples': int(n), 'test_majority_rate': rate}


def _finite(metrics: dict[str, float]) -> bool:
  return all(math.isfinite(metrics[k])
             for k in ('loss', 'grad_norm', 'param_norm'))


def _better(task: tasks.Task, new: dict[str, float],
            best: dict[str, float] | None) -> bool:
  if best is None:
    return True
  if task.higher_is_better:
    return new[task.metric] > best[task.metric]
  return new[task.metric] < best[task.metric]


def export_prompts(workdir: str, trainable: PyTree) -> tuple[str | None, int]:
  """Writes ``<workdir>/prompts.npz``: the trained prompts, MLP folded.

  A prefix trained through its MLP reparameterization ships as the prefix
  the MLP computes (``lorajax.prompts.fold``); the checkpoints keep the MLP
  so that a run can resume.

  Returns:
    ``(path, number of parameters)``, or ``(None, 0)`` without prompts.
  """
  if not trainable.get('prompts'):
    return None, 0
  folded = jax.device_get(lorajax.prompts.fold(trainable['prompts']))
  path = os.path.join(workdir, 'prompts.npz')
  if jax.process_index() == 0:
    np.savez(path, **{k: np.asarray(v) for k, v in folded.items()})
  return path, lorajax.count(folded)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates the run ``config`` describes, in ``workdir``.

  Args:
    config: a ``ConfigDict`` from ``configs/`` (see
      ``lorajax.training.config.base_config`` for the fields).
    workdir: folder for ``checkpoints/``, ``metrics.jsonl``,
      ``tensorboard/`` and ``summary.json``; a run there is resumed.

  Returns:
    The summary dict (also written to ``summary.json`` and printed).

  Raises:
    ValueError: invalid config fields (all of them listed), an unwritable
      workdir, an empty training split, a checkpoint in ``workdir`` from
      another spec or model, or from a config whose run-defining fields
      differ (unless ``config.allow_config_change``).
    workdir_lock.WorkdirLocked: another live process runs in ``workdir``.
    signals.RunStopped: SIGTERM or SIGINT came; the step under way was
      finished and checkpointed (a ``SystemExit`` of status 143 / 130).
    FloatingPointError: a non-finite loss or gradient; the checkpoints
      written before it are kept and complete.
  """
  wall_start = time.perf_counter()
  validate_lib.check_config(config)
  workdir = check_workdir(workdir)
  if config.mode not in parallel.MODES:
    raise ValueError(f'config.mode={config.mode!r}; available: '
                     f'{parallel.MODES}')
  chief = console.quietly(jax.process_index) == 0  # Starts the backend.
  lock = (workdir_lock.hold(workdir, note=_note) if chief
          else contextlib.nullcontext())
  with lock, signals.stop_requests() as stop, \
      console.capture_logs(workdir) as log_file:
    logging.info('config:\n%s', config)
    return _train(config, workdir, log_file, wall_start, stop)


def _note(message: str) -> None:
  """A sentence a person should read (stderr and the log file)."""
  logging.warning('%s', message)


def _chunk_end(config, done: int, num_steps: int, per_call: int) -> int:
  """The step a call that starts after step ``done`` ends at: the next
  multiple of ``per_call``, cut short by the next evaluation, checkpoint or
  the last step. Chunks are aligned to absolute steps, so a resumed run
  cuts the rest of the run as the uninterrupted one did."""
  end = min(num_steps, (done // per_call + 1) * per_call)
  for every in (int(config.eval_every), int(config.checkpoint_every)):
    end = min(end, (done // every + 1) * every)
  return end


def _run_chunk(runner: Runner, state: Any, frozen: PyTree,
               batches: list[dict[str, np.ndarray]], per_call: int
               ) -> tuple[Any, list[dict[str, float]]]:
  """``len(batches)`` steps in one ``runner.train_steps`` call of
  ``per_call`` steps (the rest skipped, fed copies of the last batch); the
  new state and each step's metrics."""
  n = len(batches)
  padded = batches + [batches[-1]] * (per_call - n)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *padded)
  active = np.arange(per_call) < n
  state, metrics = runner.train_steps(state, frozen,
                                      runner.put_batch(stacked),
                                      runner.put_batch(active))
  metrics = jax.device_get(metrics)
  return state, [{k: float(v[i]) for k, v in metrics.items()}
                 for i in range(n)]


def _train(config, workdir: str, log_file: str, wall_start: float,
           stop: signals.StopRequest) -> dict[str, Any]:
  """The body of ``train_and_evaluate``, with logging captured."""
  task = tasks.build_task(config)
  if not finished.rows(task.data['train']):
    raise ValueError(f'config.data.train_split={config.data.train_split!r} '
                     'has no rows; nothing to train on')
  trainable, frozen = task.split_params()
  report = lorajax.trainable_report(task.spec, task.params, task.adapters,
                                    tokens=task.method.tokens)
  logging.info('%s', report)
  n_train = lorajax.count(trainable)
  n_all = (lorajax.count(task.params) + lorajax.count(task.adapters)
           + lorajax.count(task.prompts) + lorajax.count(task.method.tokens))
  if task.prompts:
    logging.info('prompts: %d trained parameters %s', lorajax.count(
        task.prompts), ckpt_lib.tree_shapes(task.prompts))
  num_steps = int(config.num_train_steps)
  # The report's counts per rule; the paths each matched (indented lines,
  # up to hundreds on a deep model) are in the log file.
  console.say('\n'.join([
      f'{config.name}: {config.method} on {task.model.name}, '
      f'{finished.rows(task.data["train"]):,d} training rows, {num_steps} '
      f'steps of {config.batch_size}; matched paths and library logs in '
      f'{log_file}',
      *(line for line in report.splitlines() if not line.startswith(' ')),
      *([f'prompts: {lorajax.count(task.prompts):,d} trained parameters '
         f'(method {config.method})'] if task.prompts else [])]))
  tx, schedule = optim.from_config(config.optim, num_steps)
  loss_fn, tx = adalora_allocator.training_hooks(   # AdaLoRA, else as is
      task.spec, task.params, task.loss_fn, tx)
  task = dataclasses.replace(task, loss_fn=loss_fn)
  runner = parallel.runner_from_config(config, task, tx)
  state = step_lib.create_state(trainable, tx, config.seed)
  state, frozen = runner.place(state, frozen)

  ckpt_dir = os.path.join(workdir, 'checkpoints')
  manager = ckpt_lib.make_manager(ckpt_dir, max_to_keep=config.max_to_keep,
                                  async_save=config.async_checkpoint)
  meta = finished.run_meta(config, task.spec, task.model_info, trainable)
  accepted = []   # Config changes allowed by config.allow_config_change.
  restored, stored = ckpt_lib.restore_latest(
      manager, runner.to_checkpoint(state), meta, note=_note,
      check_meta=lambda stored, where: accepted.extend(
          validate_lib.check_resume(stored.get('config'), config, where)))
  train_it = loader.BatchIterator(task.data['train'],
                                  batch_size=config.batch_size,
                                  seed=config.seed, train=True)
  best_manager = ckpt_lib.make_manager(
      os.path.join(workdir, ckpt_lib.BEST_DIR), max_to_keep=None,
      async_save=False)
  best, best_step, initial, tokens_seen = None, None, None, 0
  if restored is not None:
    state, _ = runner.place(restored, frozen)
    train_it.set_state(stored['data_state'])
    best, best_step = stored.get('best'), stored.get('best_step')
    initial = stored.get('initial_validation')
    tokens_seen = stored.get('tokens_seen', 0)
    history = list(stored.get('config_changes', []))
    if accepted:
      history.append({'step': stored['step'], 'changes': accepted})
      _note(f'resuming step {stored["step"]} with changed config fields '
            '(allow_config_change): ' + '; '.join(accepted))
    if history:   # Kept in every later checkpoint of the run.
      meta['config_changes'] = history
    logging.info('resumed from %s at step %d', ckpt_dir, stored['step'])
    console.say(f'resumed at step {stored["step"]} from {ckpt_dir}')
  # A best step saved after the checkpoint resumed from is recomputed.
  ckpt_lib.keep_only(best_manager, best_step)
  start_step = int(jax.device_get(runner.to_checkpoint(state).step))
  progress = console.Progress(num_steps, start_step,
                              enabled=config.progress_bar)

  writer = metrics_lib.MetricWriter(workdir)
  eval_kw = dict(batch_size=config.eval_batch_size,
                 max_batches=config.data.max_eval_batches)

  def validate(step: int) -> dict[str, float]:
    nonlocal best, best_step
    m = finished.evaluate(runner, state.trainable, frozen,
                          task.data['validation'], **eval_kw)
    if m:
      writer.write(step, 'validation', m)
    logging.info('step %d validation %s', step, m)
    progress.write(f'step {step} validation: '
                   f'{metrics_lib.format_metrics(m)}')
    if m and _better(task, m, best):
      best, best_step = m, step
      ckpt_lib.save_best(best_manager, runner.to_checkpoint(state).trainable,
                         dict(meta, best=best, best_step=best_step), step)
    return m

  last_saved = None

  def save(step: int) -> None:
    nonlocal last_saved
    ckpt_lib.save(manager, runner.to_checkpoint(state), dict(
        meta, data_state=train_it.get_state(), best=best, best_step=best_step,
        initial_validation=initial, tokens_seen=tokens_seen))
    last_saved = step

  def stop_here(step: int) -> None:
    """Checkpoints ``step`` (if not yet) and raises ``RunStopped``."""
    if last_saved != step:
      save(step)
    ckpt_lib.wait_until_finished(manager)
    ckpt_lib.seal_finished(manager)
    progress.close()
    message = (f'stopped by {stop.name} after step {step}; checkpoint '
               f'{os.path.join(ckpt_dir, str(step))} written. Run the same '
               f'command (same --config and --workdir {workdir}) to resume '
               'from it.')
    logging.info('%s', message)
    console.say(message)
    raise signals.RunStopped(signals.exit_code(stop.signum), step, message)

  if config.eval_at_start and start_step == 0:
    initial = validate(0)
  final_val = None
  tokens, train_time, window = 0, 0.0, []
  per_call = int(config.get('steps_per_call', 1))
  if per_call > 1 and runner.train_steps is None:
    raise ValueError(f'config.steps_per_call={per_call} needs mode \'jit\' '
                     f'(mode={config.mode!r} runs one step a call)')
  try:
    step = start_step
    while step < num_steps:
      end = _chunk_end(config, step, num_steps, per_call)
      batches = [next(train_it) for _ in range(end - step)]
      counts = [int(np.sum(b[task.tokens_key])) for b in batches]
      t0 = time.perf_counter()
      if per_call > 1:
        state_new, ms = _run_chunk(runner, state, frozen, batches, per_call)
      else:
        state_new, m = runner.train_step(state, frozen,
                                         runner.put_batch(batches[0]))
        ms = [{k: float(v) for k, v in jax.device_get(m).items()}]
      dt = (time.perf_counter() - t0) / len(batches)
      for i, m in enumerate(ms):
        if not _finite(m):
          manager.wait_until_finished()
          last = manager.latest_step()
          raise FloatingPointError(
              f'non-finite training loss at step {step + i + 1}: '
              f'loss={m["loss"]}, grad_norm={m["grad_norm"]}, '
              f'param_norm={m["param_norm"]}. The run stopped without '
              f'saving this step; the last good checkpoint is step {last} '
              f'in {ckpt_dir}. Lower config.optim.learning_rate or set '
              'config.optim.clip_norm.')
      state = state_new
      for m, n_tokens in zip(ms, counts):
        step += 1
        tokens, train_time = tokens + n_tokens, train_time + dt
        tokens_seen += n_tokens
        window.append((m, n_tokens, dt))
        progress.update(step, loss=m['loss'], tokens=n_tokens, seconds=dt)
        if step % config.log_every == 0 or step == num_steps:
          row = {k: float(np.mean([w[0][k] for w in window]))
                 for k in ('loss', 'grad_norm', 'param_norm')}
          if 'correct' in m:
            row['accuracy'] = (sum(w[0]['correct'] for w in window)
                               / sum(w[0]['count'] for w in window))
          row['learning_rate'] = float(schedule(step - 1))
          row['tokens_per_sec'] = (sum(w[1] for w in window)
                                   / max(sum(w[2] for w in window), 1e-9))
          row['tokens_seen'] = tokens_seen   # Real tokens since step 0.
          writer.write(step, 'train', row)
          window = []
      # A chunk ends at every evaluation and checkpoint step (_chunk_end).
      if step % config.eval_every == 0 or step == num_steps:
        final_val = validate(step)
      if step % config.checkpoint_every == 0 or step == num_steps:
        save(step)
      ckpt_lib.seal_finished(manager)   # The last save, once it is done.
      if stop:
        stop_here(step)
    progress.close()
    if final_val is None:  # Resumed after the last step.
      final_val = validate(num_steps)
    test_final = finished.evaluate(runner, state.trainable, frozen,
                                   task.data['test'], **eval_kw)
    writer.write(num_steps, 'test_final', test_final)
    test, test_step = test_final, num_steps
    if best_step is not None and best_step != num_steps:
      if best_step in best_manager.all_steps():
        trainable_best, _ = ckpt_lib.restore_trainable(
            best_manager.directory, runner.to_checkpoint(state).trainable,
            meta, best_step)
        best_state, _ = runner.place(runner.to_checkpoint(state)._replace(
            trainable=trainable_best), frozen)
        test = finished.evaluate(runner, best_state.trainable, frozen,
                                 task.data['test'], **eval_kw)
        test_step = best_step
      else:  # A run resumed from a checkpoint of an older lorajax.
        logging.warning('no best checkpoint of step %d in %s; test is the '
                        'last step\'s', best_step, best_manager.directory)
    writer.write(test_step, 'test', test)
    console.say(f'test at step {test_step} (best validation): '
                f'{metrics_lib.format_metrics(test)}' if test_step != num_steps
                else f'test: {metrics_lib.format_metrics(test)}')
    prompts_file, prompts_params = export_prompts(
        workdir, runner.to_host(runner.to_checkpoint(state).trainable))
  finally:
    progress.close()
    ckpt_lib.wait_until_finished(manager)
    ckpt_lib.seal_finished(manager)
    writer.close()
  ckpt_lib.keep_only(best_manager, test_step)
  best_manager.close()
  last = manager.latest_step()
  manager.close()
  summary = {
      'config_name': config.name, 'method': config.method,
      'steps': num_steps, 'resumed_from': start_step,
      'trainable_params': int(n_train), 'all_params': int(n_all),
      'trainable_fraction': n_train / max(n_all, 1),
      'metric': task.metric, 'initial_validation': initial,
      # config.model.factory of a run on your own model, else None.
      'model_factory': task.model_info.get('factory'),
      # A classifier's classes in id order (its head's outputs).
      'labels': task.model_info.get('labels'),
      'best_validation': best, 'best_validation_step': best_step,
      'final_validation': final_val,
      # Test of the best validation checkpoint (step test_step), and of the
      # last step; the test set's size and its majority-class rate (the
      # accuracy of a model that learned nothing).
      'test': test, 'test_step': test_step, 'test_final': test_final,
      **_test_set(task.data['test'], eval_kw),
      'wall_time_s': time.perf_counter() - wall_start,
      'train_time_s': train_time,
      'tokens_per_sec': tokens / max(train_time, 1e-9),
      'checkpoint_step': last,
      'adapter_bytes': ckpt_lib.item_size(ckpt_dir, last, 'trainable'),
      # Prompt/prefix tuning: the folded prompts that ship, and their size.
      'prompts_file': prompts_file, 'prompts_params': prompts_params,
      'checkpoint_bytes': sum(ckpt_lib.item_size(ckpt_dir, last, item)
                              for item in ckpt_lib.ITEMS),
      'workdir': workdir,
      # Run-defining config fields changed on a resume (allow_config_change):
      # [{'step': resumed step, 'changes': ['field: old -> new', ...]}].
      'config_changes': meta.get('config_changes', []),
      # VmHWM of this process: the run's own peak when it is a subprocess.
      'peak_rss_bytes': memory.peak_rss_bytes(),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w',
              encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  console.say(metrics_lib.format_summary(summary))
  return summary
