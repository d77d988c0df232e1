"""A run survives what disks, signals and people do to it (issue 17).

Fault injection on the smoke config: damaged checkpoints of every kind,
two processes on one workdir, SIGTERM / SIGINT, bad config values, a
changed config on resume, a damaged model cache, malformed PEFT configs.
Each asserts the message a person reads and that nothing is lost: a resumed
run computes exactly the losses and adapters of a run never interrupted
(``reference``, shared with tests/test_checkpoint.py).
"""

import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from lorajax import assets
from lorajax.io import peft_format
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import finished
from lorajax.training import integrity
from lorajax.training import optim
from lorajax.training import step as step_lib
from lorajax.training import tasks
from lorajax.training import train
from lorajax.training import validate
from lorajax.training import workdir_lock

from test_checkpoint import assert_same_run  # pylint: disable=g-bad-import-order
from test_checkpoint import CONFIG
from test_checkpoint import load_config
from test_checkpoint import OVERRIDES
from test_checkpoint import reference  # pylint: disable=unused-import
from test_checkpoint import ROOT

# Runs the training command in a child that sends itself SIGNAL right after
# the train metrics of step STOP_AT are written.
_STOPPER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    stop_at, signum = int(os.environ['STOP_AT']), int(os.environ['SIGNAL'])
    from lorajax.training import metrics
    write = metrics.MetricWriter.write
    def patched(self, step, split, scalars):
      write(self, step, split, scalars)
      if split == 'train' and step == stop_at:
        os.kill(os.getpid(), signum)
    metrics.MetricWriter.write = patched
    from absl import app
    from lorajax.cli import train
    sys.argv = ['train'] + sys.argv[1:]
    app.run(train.main)
''')

_HOLDER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    from lorajax.training import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
      print('held', flush=True)
      time.sleep(120)
''')


def _copy_run(reference_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_run[2], workdir)
  return workdir


def _largest(step_dir, pattern):
  files = glob.glob(os.path.join(step_dir, pattern), recursive=True)
  return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def _flip_bit(path, offset=None):
  data = bytearray(open(path, 'rb').read())
  offset = len(data) // 2 if offset is None else offset
  data[offset] ^= 0x01
  open(path, 'wb').write(bytes(data))


def _truncate(path, size=None):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _flip_data_position(step_dir):
  """A one-bit change of the meta's data position that stays valid JSON."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  text = open(path, 'rb').read()
  at = text.index(b'"index"')
  digit = at + next(i for i, c in enumerate(text[at:]) if chr(c).isdigit())
  while chr(text[digit + 1]).isdigit():   # Its last digit: 16 -> 17.
    digit += 1
  _flip_bit(path, digit)
  assert json.loads(open(path, 'rb').read())  # Still JSON, another value.


# name: (how to damage the step folder, what the note must say)
DAMAGE = {
    'truncated_tensor': (
        lambda d: _truncate(_largest(d, 'trainable/**/d/*')), 'truncated'),
    'bit_flipped_tensor': (
        lambda d: _flip_bit(_largest(d, 'opt/**/d/*')), 'another sha256'),
    'missing_manifest_ocdbt': (
        lambda d: os.remove(os.path.join(d, 'trainable', 'manifest.ocdbt')),
        'trainable/manifest.ocdbt is missing'),
    'deleted_opt': (lambda d: shutil.rmtree(os.path.join(d, 'opt')),
                    'opt/_METADATA is missing'),
    'deleted_trainable': (
        lambda d: shutil.rmtree(os.path.join(d, 'trainable')),
        'trainable/_METADATA is missing'),
    'emptied_meta_json': (
        lambda d: _truncate(os.path.join(d, 'meta', 'metadata'), 0),
        'meta/metadata has 0 bytes'),
    'bit_flipped_meta_json': (_flip_data_position,
                              'meta/metadata has another sha256'),
    'unsealed_save': (
        lambda d: os.remove(os.path.join(d, integrity.MANIFEST)),
        'the save was not sealed'),
}


@pytest.fixture(scope='module')
def target():
  config = load_config()
  trainable, _ = tasks.build_task(config, splits=()).split_params()
  tx, _ = optim.from_config(config.optim, config.num_train_steps)
  return step_lib.create_state(trainable, tx, config.seed)


def _restore(ckpt_dir, target):
  notes = []
  expected = ckpt_lib.read_meta(ckpt_dir, 6)[1]
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=False)
  state, meta = ckpt_lib.restore_latest(manager, target, expected,
                                        note=notes.append)
  manager.close()
  return state, meta, '\n'.join(notes)


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_skipped(
    kind, reference, target, tmp_path):
  workdir = _copy_run(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  damage, says = DAMAGE[kind]
  damage(os.path.join(ckpt_dir, '10'))
  state, meta, notes = _restore(ckpt_dir, target)
  assert meta['step'] == 9 and int(state.step) == 9, notes
  assert f'checkpoint {ckpt_dir}/10 is damaged' in notes
  assert says in notes
  # Moved aside, not deleted; the intact ones stay.
  moved = glob.glob(os.path.join(workdir, integrity.DAMAGED_DIR, '*-10-*'))
  assert len(moved) == 1 and os.listdir(moved[0])
  assert sorted(os.listdir(ckpt_dir)) == ['6', '9']


def test_empty_step_folder_and_unknown_folder(reference, target, tmp_path):
  workdir = _copy_run(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  os.makedirs(os.path.join(ckpt_dir, '12'))          # Left by a copy tool.
  os.makedirs(os.path.join(ckpt_dir, 'old_runs'))    # A person's folder.
  state, meta, notes = _restore(ckpt_dir, target)
  assert meta['step'] == 10 and int(state.step) == 10
  assert f'{ckpt_dir}/12 is damaged: it has no lorajax_manifest.json: the ' \
         'folder is empty' in notes
  assert f'{ckpt_dir}/old_runs is not a checkpoint step; ignored' in notes
  assert os.path.isdir(os.path.join(ckpt_dir, 'old_runs'))


def test_checkpoints_of_an_older_lorajax_restore_unverified(
    reference, target, tmp_path):
  workdir = _copy_run(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for manifest in glob.glob(os.path.join(ckpt_dir, '*', integrity.MANIFEST)):
    os.remove(manifest)
  state, meta, notes = _restore(ckpt_dir, target)
  assert meta['step'] == 10 and int(state.step) == 10
  assert 'restoring without verifying the files' in notes


def test_damaged_checkpoints_resume_exactly_from_intact_one(
    reference, tmp_path, caplog):
  """Step 10: a flipped tensor bit, step 9: a flipped bit of the data
  position (valid JSON, another run if trusted). The run resumes at 6 and
  ends where the uninterrupted run did; max_to_keep=1 keeps a sealed one."""
  workdir = _copy_run(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  DAMAGE['bit_flipped_tensor'][0](os.path.join(ckpt_dir, '10'))
  _flip_data_position(os.path.join(ckpt_dir, '9'))
  summary = train.train_and_evaluate(load_config(max_to_keep=1), workdir)
  err = caplog.text
  assert summary['resumed_from'] == 6
  assert f'{ckpt_dir}/10 is damaged' in err and f'{ckpt_dir}/9 is damaged' \
      in err and 'meta/metadata has another sha256' in err
  assert_same_run(workdir, reference)
  assert os.listdir(ckpt_dir) == ['10']
  assert integrity.verify(os.path.join(ckpt_dir, '10')) is None
  assert len(os.listdir(os.path.join(workdir, integrity.DAMAGED_DIR))) == 2


def test_full_disk_at_seal_is_named_and_that_step_passed_over(
    target, tmp_path, monkeypatch):
  """ENOSPC while the manifest is written (a write hook: no tmpfs needed);
  Orbax's own writes failing leave a tmp folder, never restored
  (tests/test_checkpoint.py)."""
  ckpt_dir = str(tmp_path / 'checkpoints')
  meta = {'shapes': ckpt_lib.tree_shapes(target.trainable), 'model': {},
          'spec': {}, 'data_state': {}}
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=False)
  ckpt_lib.save(manager, target, meta)                       # Step 0.

  def full(path, obj):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(integrity, 'write_json_atomic', full)
  with pytest.raises(OSError, match=r'cannot write the manifest of '
                     rf'checkpoint {ckpt_dir}/7 \(No space left on device'):
    ckpt_lib.save(manager, target._replace(step=target.step + 7), meta)
  manager.close()
  monkeypatch.undo()
  notes = []
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=False)
  state, stored = ckpt_lib.restore_latest(manager, target, meta,
                                          note=notes.append)
  manager.close()
  assert stored['step'] == 0 and int(state.step) == 0
  assert 'checkpoints/7 is damaged: it has no lorajax_manifest.json: the ' \
      'save was not sealed' in '\n'.join(notes)


def test_damaged_best_checkpoint_is_refused_by_name(reference, tmp_path):
  workdir = _copy_run(reference, tmp_path)
  best = glob.glob(os.path.join(workdir, ckpt_lib.BEST_DIR, '*'))
  assert len(best) == 1 and integrity.verify(best[0]) is None
  tensor = _largest(best[0], 'trainable/**/d/*')
  _flip_bit(tensor)
  with pytest.raises(ValueError) as err:
    finished.evaluate_checkpoint(load_config(), workdir, step='best')
  assert f'checkpoint {best[0]} is damaged: ' \
      f'{os.path.relpath(tensor, best[0])} has another sha256' in str(err.value)
  # An emptied meta JSON is named too, not a raw JSON error.
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  _truncate(os.path.join(ckpt_dir, '10', 'meta', 'metadata'), 0)
  with pytest.raises(ValueError, match=f'checkpoint {ckpt_dir}/10 is '
                     'damaged: meta/metadata has 0 bytes'):
    ckpt_lib.read_meta(ckpt_dir)


def _run_stopped(tmp_path, signum, stop_at):
  script = tmp_path / 'stopper.py'
  script.write_text(_STOPPER.format(root=ROOT))
  workdir = tmp_path / 'run'
  args = [sys.executable, str(script), f'--config={CONFIG}:smoke',
          f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                     for k, v in OVERRIDES.items()]
  env = dict(os.environ, STOP_AT=str(stop_at), SIGNAL=str(int(signum)))
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  return str(workdir), proc


def test_sigterm_checkpoints_the_step_and_resumes_bit_identical(
    tmp_path, reference):
  workdir, proc = _run_stopped(tmp_path, signal.SIGTERM, stop_at=4)
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert (f'stopped by SIGTERM after step 4; checkpoint {workdir}/'
          'checkpoints/4 written' in proc.stdout), proc.stdout[-2000:]
  assert integrity.verify(os.path.join(workdir, 'checkpoints', '4')) is None
  summary = train.train_and_evaluate(load_config(), workdir)
  assert summary['resumed_from'] == 4
  assert_same_run(workdir, reference)


def test_ctrl_c_stops_cleanly_without_traceback(tmp_path):
  workdir, proc = _run_stopped(tmp_path, signal.SIGINT, stop_at=2)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'stopped by SIGINT after step 2' in proc.stdout
  assert integrity.verify(os.path.join(workdir, 'checkpoints', '2')) is None


# Runs the training command in a child whose disk fills up while the
# checkpoint of step FAIL_AT is written: Orbax's write of the meta JSON puts
# half its bytes down, then fails with ENOSPC (a write hook: no tmpfs needed).
_FULL_DISK = textwrap.dedent('''
    import errno, os, sys
    sys.path.insert(0, {root!r})
    fail_at = os.path.join('checkpoints', os.environ['FAIL_AT'] +
                           '.orbax-checkpoint-tmp')
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
    save_fn = h.JsonCheckpointHandler._save_fn
    async def full(self, x, directory):
      if fail_at not in str(directory):
        return await save_fn(self, x, directory)
      path = directory / self._filename
      path.write_text('{{"half": ')
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    h.JsonCheckpointHandler._save_fn = full
    from absl import app
    from lorajax.cli import train
    sys.argv = ['train'] + sys.argv[1:]
    app.run(train.main)
''')


def test_full_disk_at_a_checkpoint_stops_with_the_file_named_then_resumes(
    tmp_path, reference):
  script = tmp_path / 'full_disk.py'
  script.write_text(_FULL_DISK.format(root=ROOT))
  workdir = str(tmp_path / 'run')
  args = [sys.executable, str(script), f'--config={CONFIG}:smoke',
          f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                     for k, v in OVERRIDES.items()]
  proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, FAIL_AT='6'),
                        capture_output=True, text=True, timeout=300)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert proc.returncode == 1, proc.stderr[-3000:]
  # Orbax logs its thread's error; the run ends with what to do, and no
  # traceback of lorajax's own frames.
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'lorajax-train: [Errno 28] cannot write a '
                         f'checkpoint in {ckpt_dir}: No space left on device '
                         f'({ckpt_dir}/6.orbax-checkpoint-tmp/meta'), last
  assert 'free space and run the same command again' in last
  assert f'File "{ROOT}/lorajax' not in proc.stderr, proc.stderr[-3000:]
  # No writer thread of the failed save outlives the error (it would fail
  # again at interpreter shutdown, after the message).
  assert 'after interpreter shutdown' not in proc.stderr, proc.stderr[-3000:]
  assert 'new futures after shutdown' not in proc.stderr, proc.stderr[-3000:]
  assert integrity.verify(os.path.join(ckpt_dir, '3')) is None
  summary = train.train_and_evaluate(load_config(), workdir)
  assert summary['resumed_from'] == 3
  assert_same_run(workdir, reference)


def _start_holder(tmp_path, workdir):
  script = tmp_path / 'holder.py'
  script.write_text(_HOLDER.format(root=ROOT))
  os.makedirs(workdir, exist_ok=True)
  proc = subprocess.Popen([sys.executable, str(script), workdir],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_second_process_on_a_workdir_refuses_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = _start_holder(tmp_path, workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked) as err:
      train.train_and_evaluate(load_config(), workdir)
  finally:
    holder.kill()
    holder.wait()
  message = str(err.value)
  assert f'pid {holder.pid} on host {socket.gethostname()!r}' in message
  assert 'started 20' in message and 'in use by another run' in message
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


def test_command_line_refusals_have_no_traceback(tmp_path):
  """What a person sees: the reason on stderr, status 1."""
  workdir = str(tmp_path / 'run')
  base = [sys.executable, '-m', 'lorajax.cli.train',
          f'--config={CONFIG}:smoke', f'--workdir={workdir}']
  bad = subprocess.run(base + ['--config.optim.learning_rate=-1',
                               '--config.eval_every=0'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr
  assert 'config.optim.learning_rate=-1.0: expected a finite number > 0' \
      in bad.stderr and 'config.eval_every=0' in bad.stderr
  holder = _start_holder(tmp_path, workdir)
  try:
    busy = subprocess.run(base, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert busy.returncode == 1 and 'Traceback' not in busy.stderr
  assert f'is in use by another run: pid {holder.pid}' in busy.stderr


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = _start_holder(tmp_path, workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  notes = []
  with workdir_lock.hold(workdir, note=notes.append) as me:
    assert me['pid'] == os.getpid()
  assert len(notes) == 1 and f'pid {holder.pid}' in notes[0]
  assert 'ended without releasing it' in notes[0]
  with workdir_lock.hold(workdir, note=notes.append):  # Clean: no note.
    pass
  assert len(notes) == 1


@pytest.mark.parametrize('field,value,says', [
    ('optim.learning_rate', -1.0, 'a finite number > 0'),
    ('optim.learning_rate', float('inf'), 'a finite number > 0'),
    ('max_to_keep', 0, 'an integer >= 1'),
    ('eval_every', 0, 'an integer >= 1'),
    ('checkpoint_every', 0, 'an integer >= 1'),
    ('lora.alpha', float('nan'), 'a finite number'),
    ('lora.rank', 0, 'an integer >= 1'),
    ('optim.decay', 'cosin', "one of ('cosine', 'linear', 'constant')"),
    ('method', 'loraa', 'one of ('),
    ('data.train_split', 'train[:0]', 'a split slice that selects at least'),
    ('data.validation_split', '', 'a split name'),
])
def test_bad_value_is_refused_before_anything_runs(field, value, says,
                                                   tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(load_config(**{field: value}), str(workdir))
  assert f'config.{field}={value!r}: expected {says}' in str(err.value)
  assert not workdir.exists()   # Refused before the workdir is touched.


def test_every_bad_field_is_listed_at_once():
  found = validate.problems(load_config(**{'optim.learning_rate': 0.0,
                                           'max_to_keep': 0}))
  assert [p.split('=')[0] for p in found] == ['config.max_to_keep',
                                              'config.optim.learning_rate']
  assert validate.problems(load_config()) == []


def test_changed_config_on_resume_is_refused_or_recorded(reference,
                                                         tmp_path):
  workdir = _copy_run(reference, tmp_path)
  changed = {'optim.learning_rate': 2e-3, 'optim.clip_norm': 0.0}
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(load_config(**changed), workdir)
  message = str(err.value)
  assert '2 run-defining fields differ' in message
  assert 'optim.clip_norm: 1.0 -> 0.0' in message
  assert 'optim.learning_rate: 0.001 -> 0.002' in message
  assert '--config.allow_config_change=True' in message
  # Only how often to log/evaluate/save changed: not a change of the run.
  assert validate.config_changes(
      ckpt_lib.read_meta(os.path.join(workdir, 'checkpoints'))[1]['config'],
      load_config(eval_every=5, max_to_keep=1)) == []
  # Allowed, a change that keeps the optimizer's structure continues and is
  # recorded; turning clipping off cannot continue that optimizer state.
  with pytest.raises(ValueError, match='does not fit this run.s state.*'
                     'clipping turned on or off'):
    train.train_and_evaluate(
        load_config(allow_config_change=True, **changed), workdir)
  summary = train.train_and_evaluate(load_config(
      allow_config_change=True, **{'optim.learning_rate': 2e-3}), workdir)
  assert summary['config_changes'] == [{'step': 10, 'changes': [
      'optim.learning_rate: 0.001 -> 0.002']}]


def test_damaged_cached_model_file_is_rebuilt_from_the_wheel(
    tmp_path, monkeypatch, caplog):
  wheel = assets.wheel_path('minilm', download=False)
  cache = tmp_path / 'cache'
  (cache / 'wheels').mkdir(parents=True)
  os.symlink(wheel, cache / 'wheels' / wheel.name)
  monkeypatch.setenv('LORAJAX_CACHE', str(cache))
  member = 'model/config.json'
  path = assets.asset_path('minilm', member)
  good = path.read_bytes()
  _flip_bit(path)
  assert path.read_bytes() != good
  again = assets.asset_path('minilm', member)
  assert again == path and again.read_bytes() == good
  assert f'{path} was damaged' in caplog.text
  assert 'rebuilt it from the verified wheel' in caplog.text
  _truncate(path)
  assert assets.asset_path('minilm', member).read_bytes() == good


@pytest.mark.parametrize('field,value,says', [
    ('lora_alpha', None, 'lora_alpha=None: expected a finite number'),
    ('r', 'eight', "r='eight': expected an integer >= 1"),
    ('r', 0, 'r=0: expected an integer >= 1'),
    ('lora_alpha', 'NaN', "lora_alpha='NaN': expected a finite number"),
])
def test_malformed_peft_config_names_file_and_field(field, value, says,
                                                    tmp_path):
  cfg = {'peft_type': 'LORA', 'r': 8, 'lora_alpha': 16,
         'target_modules': ['query'], field: value}
  (tmp_path / peft_format.CONFIG_FILE).write_text(json.dumps(cfg))
  with pytest.raises(peft_format.PeftFormatError) as err:
    peft_format.import_peft(tmp_path, config=None)
  assert str(tmp_path / peft_format.CONFIG_FILE) in str(err.value)
  assert says in str(err.value)
