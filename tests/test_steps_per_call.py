"""Several train steps in one compiled call (``config.steps_per_call``).

What a user relies on: the same steps as one step a call (up to float
rounding), checkpoints and evaluations at the same steps, one compiled
program, an exact resume, and bad values named. (A non-finite step inside
a call is named: ``test_training``'s non-finite test, ``per_call=4``.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import metrics as metrics_lib
from lorajax.training import optim
from lorajax.training import parallel
from lorajax.training import step as step_lib
from lorajax.training import train
from lorajax.training import validate

from test_checkpoint import assert_same_run  # pylint: disable=g-bad-import-order
from test_checkpoint import final_trainable
from test_checkpoint import load_config
from test_checkpoint import losses
from test_checkpoint import reference  # pylint: disable=unused-import
from test_checkpoint import run_killed
from test_checkpoint import STEPS

PER_CALL = {'steps_per_call': 4}


def _noisy_loss(trainable, frozen, batch, rng):
  """A least-squares loss with a random mask: it reads the step's key."""
  keep = jax.random.bernoulli(rng, 0.7, batch['y'].shape)
  pred = batch['x'] @ trainable['params']['w'] + frozen['b']
  err = jnp.where(keep, (pred - batch['y']) ** 2, 0.0)
  return jnp.mean(err), {'loss_sum': jnp.sum(err),
                         'count': jnp.float32(err.shape[0])}


def _toy(k=4, n=3):
  rng = np.random.default_rng(0)
  batches = [{'x': rng.normal(size=(8, 3)).astype(np.float32),
              'y': rng.normal(size=8).astype(np.float32)} for _ in range(n)]
  tx, _ = optim.make_optimizer(learning_rate=0.1, num_steps=8)
  runner = parallel.jit_runner(loss_fn=_noisy_loss, eval_fn=None, tx=tx)
  trainable = {'adapters': {}, 'params': {'w': jnp.zeros(3)}}
  state, frozen = runner.place(step_lib.create_state(trainable, tx, 3),
                               {'b': jnp.float32(0.1)})
  padded = batches + [batches[-1]] * (k - n)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *padded)
  return runner, state, frozen, batches, stacked


def test_one_call_runs_the_steps_one_call_each_would():
  runner, state, frozen, batches, stacked = _toy()
  one, singles = state, []
  for b in batches:
    one, m = runner.train_step(one, frozen, b)
    singles.append(jax.device_get(m))
  active = np.array([True, True, True, False])
  several, ms = runner.train_steps(state, frozen, stacked, active)
  ms = jax.device_get(ms)
  assert int(several.step) == 3   # the skipped step is not counted
  np.testing.assert_allclose(several.trainable['params']['w'],
                             one.trainable['params']['w'], rtol=1e-6)
  for i, m in enumerate(singles):
    for key, value in m.items():
      np.testing.assert_allclose(ms[key][i], value, rtol=1e-5, err_msg=key)
  assert all(float(v[3]) == 0.0 for v in ms.values())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               several.opt_state, one.opt_state)


def test_chunks_of_any_length_share_one_program():
  runner, state, frozen, _, stacked = _toy()
  for n in (4, 1, 3):
    state, _ = runner.train_steps(state, frozen, stacked,
                                  np.arange(4) < n)
  assert int(state.step) == 8
  assert runner.train_steps._cache_size() == 1  # pylint: disable=protected-access


def test_chunks_end_at_evaluations_checkpoints_and_the_last_step():
  config = load_config(eval_every=5, checkpoint_every=3)

  def ends(start, per_call):
    out, done = [], start
    while done < STEPS:
      done = train._chunk_end(config, done, STEPS, per_call)  # pylint: disable=protected-access
      out.append(done)
    return out
  assert ends(0, 4) == [3, 4, 5, 6, 8, 9, 10]
  assert ends(6, 4) == [8, 9, 10]   # a resume cuts the rest the same way
  assert ends(0, 1) == list(range(1, STEPS + 1))


@pytest.fixture(scope='module')
def per_call_run(tmp_path_factory):
  """The reference run of test_checkpoint, four steps a call."""
  workdir = str(tmp_path_factory.mktemp('per_call'))
  config = load_config(**PER_CALL)
  summary = train.train_and_evaluate(config, workdir)
  return losses(workdir), final_trainable(workdir, config), workdir, summary


def test_steps_per_call_trains_the_same_steps(reference, per_call_run):
  want_losses, want_trainable, want_dir = reference
  got_losses, got_trainable, got_dir, summary = per_call_run
  assert list(got_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got_losses[s] for s in got_losses],
                             [want_losses[s] for s in got_losses],
                             rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               got_trainable, want_trainable)

  def validations(d):
    rows = metrics_lib.read_jsonl(f'{d}/metrics.jsonl', split='validation')
    return {s: r['loss'] for s, r in rows.items()}
  assert list(validations(got_dir)) == list(validations(want_dir))
  np.testing.assert_allclose(list(validations(got_dir).values()),
                             list(validations(want_dir).values()), rtol=1e-5)
  got_ckpt = ckpt_lib.make_manager(f'{got_dir}/checkpoints')
  want_ckpt = ckpt_lib.make_manager(f'{want_dir}/checkpoints')
  assert got_ckpt.all_steps() == want_ckpt.all_steps()
  got_ckpt.close()
  want_ckpt.close()
  assert summary['steps'] == STEPS


def test_sigkill_mid_call_resumes_exactly(tmp_path, per_call_run):
  workdir = run_killed(tmp_path, 'train', kill_at=8, overrides=PER_CALL)
  assert max(losses(workdir)) == 8
  summary = train.train_and_evaluate(load_config(**PER_CALL), workdir)
  assert summary['resumed_from'] in (3, 6)   # 6 may still be in flight
  assert_same_run(workdir, per_call_run[:3], **PER_CALL)


@pytest.mark.parametrize('overrides,message', [
    (dict(steps_per_call=0),
     r'config.steps_per_call=0: expected an integer >= 1'),
    (dict(steps_per_call=4, mode='pmap'),
     r"config.steps_per_call=4: expected 1 with mode='pmap'"),
    (dict(steps_per_call=2, mode='mesh'),
     r"config.steps_per_call=2: expected 1 with mode='mesh'"),
])
def test_bad_steps_per_call_is_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(load_config(**overrides))


def test_changing_steps_per_call_on_resume_is_allowed():
  stored = load_config().to_dict()
  assert not validate.config_changes(stored, load_config(**PER_CALL))
