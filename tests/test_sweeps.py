"""Sweeps: expansion, skip/resume, reproduction commands, the report (no training)."""

import csv
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

from absl import flags
import jax
import jax.numpy as jnp
from matplotlib import image as mpimg
from ml_collections import config_flags
import pytest

import lorajax
from lorajax.profiling import step_profile
from lorajax.runtime import memory
from lorajax.sweeps import grid
from lorajax.sweeps import report
from lorajax.sweeps import runner

SMOKE = 'configs/rt_minilm_sweep.py:smoke'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def write_config(tmp_path, sweep_body: str) -> str:
  path = tmp_path / 'cfg.py'
  path.write_text(textwrap.dedent('''
      from lorajax.training import config as config_lib

      def get_config(arg=None):
        c = config_lib.base_config('classification')
        config_lib.shrink(c)
        c.lock()
        return c

      def sweep(add):
      ''') + textwrap.indent(textwrap.dedent(sweep_body), '  '))
  return str(path)


class FakeTrainer:
  """A launcher that writes what a run leaves, or dies part-way."""

  def __init__(self, die=()):
    self.calls = []
    self.die = set(die)

  def __call__(self, run):
    self.calls.append(run.name)
    os.makedirs(os.path.join(run.workdir, 'checkpoints', '2'), exist_ok=True)
    if run.name in self.die:
      return -9
    c = run.config
    lora = c.method == 'lora'
    acc = {'lora': 0.70 + 0.002 * c.lora.rank / (1 + abs(c.lora.alpha - 8)),
           'full': 0.80, 'head': 0.60}[c.method]
    n = {'lora': 100 * c.lora.rank, 'full': 10**6, 'head': 770}[c.method]
    with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
      for step, tps in ((10, 50.0), (20, 400.0), (30, 420.0)):
        f.write(json.dumps({'step': step, 'split': 'train',
                            'tokens_per_sec': tps}) + '\n')
    summary = {
        'metric': 'accuracy', 'steps': 30, 'resumed_from': 0,
        'trainable_params': n, 'trainable_fraction': n / 2e6,
        'best_validation': {'accuracy': acc + 0.01}, 'best_validation_step': 30,
        'test': {'accuracy': acc}, 'tokens_per_sec': 300.0,
        'train_time_s': 10.0, 'adapter_bytes': 4 * n if lora else 8 * n,
        'wall_time_s': 20.0, 'peak_rss_bytes': 2**30}
    with open(os.path.join(run.workdir, runner.SUMMARY), 'w') as f:
      json.dump(summary, f)
    return 0


def test_expands_the_shipped_sweep():
  runs = grid.expand('configs/rt_minilm_sweep.py', '/tmp/sw')
  assert len(runs) == (3 * 2 + 2) * 3  # Three seeds, seed-major.
  assert [r.config.seed for r in runs[::8]] == [0, 1, 2]
  assert runs[8].name == 'lora.rank=1,lora.alpha=1,seed=1'
  runs = runs[:8]
  assert runs[0].name == 'lora.rank=1,lora.alpha=1,seed=0'
  assert runs[0].workdir == '/tmp/sw/lora.rank=1,lora.alpha=1,seed=0'
  assert len({r.name for r in runs}) == len(runs)
  assert [r.config.method for r in runs[-2:]] == ['full', 'head']
  assert runs[-2].config.optim.learning_rate == 5e-5
  assert (runs[5].config.lora.rank, runs[5].config.lora.alpha) == (64, 32.0)
  assert runs[5].command() == (
      'python -m lorajax.cli.train --config=configs/rt_minilm_sweep.py '
      '--workdir=/tmp/sw/lora.rank=64,lora.alpha=32,seed=0 '
      '--config.lora.rank=64 --config.lora.alpha=32 --config.seed=0')


def test_command_quotes_values_with_commas():
  lr_factors = 'params/classifier/.*=10,adapters/.*/b=16'
  run = grid.expand(SMOKE, '/tmp/sw', {'optim.lr_factors': lr_factors})[0]
  assert f"'--config.optim.lr_factors={lr_factors}'" in run.command()


def test_command_reproduces_the_run_config():
  for run in grid.expand(SMOKE, '/tmp/sw', {'num_train_steps': 3}):
    argv = shlex.split(run.command())
    assert argv[:3] == ['python', '-m', 'lorajax.cli.train']
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        'config', None, flag_values=values, sys_argv=argv[2:])
    flags.DEFINE_string('workdir', None, '', flag_values=values)
    values(argv[2:])
    assert values.workdir == run.workdir
    assert holder.value.to_dict() == run.config.to_dict()
    assert holder.value.num_train_steps == 3


def test_misspelled_key_is_an_error_before_any_run(tmp_path):
  path = write_config(tmp_path, '''
      add(**{'lora.rank': 2})
      add(**{'lora.rnak': 4})
      ''')
  with pytest.raises(ValueError,
                     match=r"'lora.rnak'.*did you mean 'lora.rank'"):
    grid.expand(path, str(tmp_path / 'sweep'))
  assert not (tmp_path / 'sweep').exists()


@pytest.mark.parametrize('body, message', [
    ("add(**{'lora': 2})", 'group of fields'),
    ("add(**{'optimizer.learning_rate': 1.0})", "'optimizer.learning_rate'"),
    ("add(**{'lora.rank': 'big'})", 'does not fit the config'),
    ("add(**{'lora.rank': 2})\nadd(**{'lora.rank': 2})", 'same run'),
    ("pass", 'added no run'),
])
def test_bad_sweep_entries_raise(tmp_path, body, message):
  with pytest.raises(ValueError, match=message):
    grid.expand(write_config(tmp_path, body), str(tmp_path / 'sweep'))


@pytest.mark.parametrize('overrides, name', [
    ({'lora.rank': 8, 'lora.alpha': 16}, 'lora.rank=8,lora.alpha=16'),
    ({'optim.learning_rate': 5e-5}, 'optim.learning_rate=5e-05'),
    ({'lora.rslora': True}, 'lora.rslora=true'),
    ({}, 'base'),
])
def test_run_names(overrides, name):
  assert grid.run_name(overrides) == name


def test_unsafe_names_are_safe_and_distinct():
  a = grid.run_name({'lora.targets': r'.*/(query|value)/kernel'})
  b = grid.run_name({'lora.targets': r'.*/(query/value)/kernel'})
  long = grid.run_name({'x': 'y' * 500})
  for name in (a, b, long):
    assert all(c.isalnum() or c in '._,=+-' for c in name), name
  assert a != b and len(long) <= 120


def test_skips_finished_and_resumes_interrupted(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))
  killed = runs[1].name
  trainer = FakeTrainer(die=[killed])
  out = runner.run_sweep(runs, str(tmp_path), launcher=trainer,
                         echo=lambda s: None)
  assert out[killed] == 'failed'
  assert sum(v == 'done' for v in out.values()) == len(runs) - 1
  assert runner.run_status(runs[1].workdir) == 'unfinished'

  lines, trainer = [], FakeTrainer()
  out = runner.run_sweep(runs, str(tmp_path), launcher=trainer,
                         echo=lines.append)
  assert trainer.calls == [killed]
  assert out[killed] == 'done'
  assert sum(v == 'skipped' for v in out.values()) == len(runs) - 1
  text = '\n'.join(lines)
  assert f'{killed}: resuming from step 2' in text
  for run in runs:  # Every run's command is printed, skipped ones too.
    assert run.command() in text


def test_progress_lines_time_each_run_and_estimate_the_rest(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))[:3]
  ticks = iter(range(0, 1000, 50))  # Each clock() call is 50 s later.
  lines = []
  out = runner.run_sweep(runs, str(tmp_path), launcher=FakeTrainer(),
                               echo=lines.append, clock=lambda: next(ticks))
  assert list(out.values()) == ['done'] * 3
  ends = [l for l in lines if ': done' in l]
  assert ends[0].endswith('done in 50s; about 1m40s left for 2 more runs')
  assert ends[1].endswith('done in 50s; about 50s left for 1 more run')
  assert ends[2].endswith('done in 50s')
  assert lines[-1] == '3 runs, 3 done, 0 skipped, 0 failed, in 5m50s'


def test_changed_config_is_an_error_before_any_run(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))
  runner.run_sweep(runs[:1], str(tmp_path), launcher=FakeTrainer(),
                   echo=lambda s: None)
  changed = grid.expand(SMOKE, str(tmp_path), {'num_train_steps': 9})
  trainer = FakeTrainer()
  with pytest.raises(ValueError, match='num_train_steps: 6 -> 9'):
    runner.run_sweep(changed, str(tmp_path), launcher=trainer)
  assert not trainer.calls


def test_fields_added_to_the_config_since_do_not_block(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))
  runner.run_sweep(runs[:1], str(tmp_path), launcher=FakeTrainer(),
                   echo=lambda s: None)
  path = os.path.join(runs[0].workdir, runner.RUN_FILE)
  with open(path) as f:
    record = json.load(f)
  del record['config']['lora.dropout']  # As if written before it existed.
  with open(path, 'w') as f:
    json.dump(record, f)
  lines, trainer = [], FakeTrainer()
  assert runner.run_sweep(runs[:1], str(tmp_path), launcher=trainer,
                          echo=lines.append) == {runs[0].name: 'skipped'}
  assert 'fields added since 1 run(s) were made' in lines[0]
  assert lines[0].endswith(': lora.dropout; removed: none')


def test_one_sweep_process_per_folder(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))
  inner = []

  def launcher(run):
    with pytest.raises(RuntimeError, match='another sweep is running'):
      runner.run_sweep(runs, str(tmp_path), launcher=FakeTrainer())
    inner.append(run.name)
    return FakeTrainer()(run)

  runner.run_sweep(runs[:1], str(tmp_path), launcher=launcher,
                   echo=lambda s: None)
  assert inner == [runs[0].name]


@pytest.mark.parametrize('module', [grid.TRAIN_MODULE,
                                    step_profile.PROFILE_MODULE])
def test_launched_programs_ship_with_the_package(module):
  """What a sweep or a profile starts is a module of the installed package."""
  found = importlib.util.find_spec(module)
  assert module.startswith('lorajax.cli.') and found is not None
  package_dir = os.path.dirname(os.path.abspath(lorajax.__file__))
  assert os.path.abspath(found.origin).startswith(package_dir + os.sep)


def test_subprocess_launcher_runs_the_command(tmp_path, monkeypatch):
  (tmp_path / 'fake_train.py').write_text(textwrap.dedent('''
      import json, os, sys
      workdir = [a for a in sys.argv if a.startswith('--workdir=')][0][10:]
      print('args', sys.argv[1:])
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump({'argv': sys.argv[1:]}, f)
      '''))
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  monkeypatch.setattr(grid, 'TRAIN_MODULE', 'fake_train')
  run = grid.expand(SMOKE, str(tmp_path / 'sweep'))[0]
  assert runner.run_sweep([run], str(tmp_path / 'sweep'),
                          echo=lambda s: None) == {run.name: 'done'}
  with open(os.path.join(run.workdir, runner.SUMMARY)) as f:
    assert json.load(f)['argv'] == list(run.argv)
  with open(os.path.join(run.workdir, runner.LOG_FILE)) as f:
    assert f.read().startswith(f'$ {run.command()}\n')


def test_a_run_dies_with_its_sweep_process(tmp_path):
  """SIGKILL the sweep process mid-run: its training child goes too, so a
  restarted sweep never races an orphan for the same workdir."""
  (tmp_path / 'slow_train.py').write_text(textwrap.dedent('''
      import os, sys, time
      from lorajax.sweeps import runner
      runner.die_with_parent_from_env()
      workdir = [a for a in sys.argv if a.startswith('--workdir=')][0][10:]
      with open(os.path.join(workdir, 'pid'), 'w') as f:
        f.write(str(os.getpid()))
      time.sleep(120)
      '''))
  sweep_dir = tmp_path / 'sweep'
  script = textwrap.dedent(f'''
      from lorajax.sweeps import grid, runner
      grid.TRAIN_MODULE = 'slow_train'
      runs = grid.expand({SMOKE!r}, {str(sweep_dir)!r})[:1]
      runner.run_sweep(runs, {str(sweep_dir)!r})
      ''')
  env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{ROOT}')
  parent = subprocess.Popen([sys.executable, '-c', script], env=env,
                            stdout=subprocess.DEVNULL, cwd=ROOT)
  pid_files = []
  deadline = time.monotonic() + 120
  while not pid_files and time.monotonic() < deadline:
    time.sleep(0.2)
    pid_files = list(sweep_dir.glob('*/pid'))
  assert pid_files, 'the run never started'
  time.sleep(0.5)
  child = int(pid_files[0].read_text())
  os.kill(child, 0)  # Alive while its sweep is.
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    if _is_zombie(child):
      break
    time.sleep(0.2)
  else:
    os.kill(child, signal.SIGKILL)
    raise AssertionError('the run outlived its sweep process')


def _is_zombie(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] == 'Z'
  except OSError:
    return True


def test_report_from_a_fake_sweep(tmp_path):
  runs = grid.expand(SMOKE, str(tmp_path))
  runner.run_sweep(runs, str(tmp_path), launcher=FakeTrainer(
      die=[runs[0].name]), echo=lambda s: None)
  paths = report.write_report(str(tmp_path))
  with open(paths['csv'], newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['name'] for r in rows] == [r.name for r in runs]
  assert rows[0]['status'] == 'unfinished' and rows[0]['test'] == ''
  by_name = {r['name']: r for r in rows}
  full = by_name['method=full,optim.learning_rate=5e-05,seed=0']
  assert full['lora.rank'] == '' and full['method'] == 'full'
  assert float(full['test']) == pytest.approx(0.80)
  lora = by_name['lora.rank=2,lora.alpha=8,seed=0']
  assert (lora['lora.rank'], lora['lora.alpha']) == ('2', '8.0')
  assert float(lora['test']) == pytest.approx(0.704)
  assert float(lora['step_time_ms']) == pytest.approx(1000 * 100 / 410)
  assert float(lora['peak_memory_mb']) == 1024
  assert lora['command'] == runs[3].command()
  with open(paths['md']) as f:
    md = f.read()
  assert md.count('\n| `') == len(runs) + len(runs) // 3
  assert 'Full fine-tuning: test 80.0 ± 0.0 (95% CI ± 0.0, n=3)' in md
  assert 'Head-only: test 60.0 ± 0.0' in md
  assert ('Best LoRA configuration by mean validation accuracy: '
          '`lora.rank=2,lora.alpha=8`') in md
  for name in ('metric_vs_rank', 'rank_alpha_heatmap', 'metric_vs_params'):
    pixels = mpimg.imread(paths[name])
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # Not a blank image.


def test_swept_values_with_pipes_are_escaped_in_the_table(tmp_path):
  path = write_config(tmp_path, """
      add(**{'lora.targets': '.*/attention/(query|value)/kernel'})
      add(**{'lora.targets': '.*/attention/key/kernel'})""")
  sweep_dir = str(tmp_path / 'sweep')
  runs = grid.expand(path, sweep_dir)
  runner.run_sweep(runs, sweep_dir, launcher=FakeTrainer(),
                   echo=lambda s: None)
  with open(report.write_report(sweep_dir)['md']) as f:
    md = f.read()
  assert '| `.*/attention/(query\\|value)/kernel` |' in md


def test_report_of_an_empty_folder_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no sweep runs'):
    report.write_report(str(tmp_path))


def test_peak_rss_is_read_from_proc():
  peak, now = memory.peak_rss_bytes(), memory.rss_bytes()
  assert peak >= now > 0


def test_subprocess_peak_rss_is_its_own():
  """VmHWM starts afresh at exec: a small child reports a small peak."""
  code = (f'exec(open({memory.__file__!r}).read()); '
          'print(peak_rss_bytes())')
  child = int(subprocess.run([sys.executable, '-S', '-c', code], check=True,
                             capture_output=True, text=True).stdout)
  assert 0 < child < memory.peak_rss_bytes() / 2


def test_xla_flops_of_a_matmul():
  x = jnp.ones((8, 16))
  compiled = jax.jit(lambda a, b: a @ b).lower(x, x.T).compile()
  assert step_profile.xla_flops(compiled) == pytest.approx(2 * 8 * 16 * 8)


def test_profile_fit_table_and_plot(tmp_path):
  rows = [{'batch_size': b, 'step_time_s': 0.01 * b, 'flops': 1e6 * b * 4,
           'tokens': 4 * b, 'real_tokens': 3 * b, 'trainable_params': 10,
           'setup_rss_bytes': 2**29, 'peak_rss_bytes': (500 + 3 * b) * 2**20}
          for b in (1, 2, 4, 8)]
  fit = step_profile.fit_memory(rows)
  assert fit['slope_mb'] == pytest.approx(3.0)
  assert fit['intercept_mb'] == pytest.approx(500.0)
  text = step_profile.markdown(rows, fit, 'demo')
  assert text.count('\n| ') == 1 + len(rows)
  assert 'Memory per extra example: 3.00 MB' in text
  assert 'spread 0.00%' in text
  for r in rows:
    r['flops'] += 3e6  # A per-step part (the optimizer update).
  assert step_profile.fit_flops(rows) == pytest.approx(
      {'per_token': 1e6, 'per_step': 3e6})
  pixels = mpimg.imread(step_profile.plot(rows, fit, str(tmp_path / 'p.png'),
                                          'demo'))
  assert pixels.shape[0] > 100 and pixels.std() > 0


# ---- seeds, aggregation, verdicts, plots (hand-written sweep folders) ------


def test_seeds_repeat_every_entry_seed_major(tmp_path):
  path = write_config(tmp_path, """
      add(**{'lora.rank': 2})
      add(**{'lora.rank': 4, 'seed': 7})
      """)
  runs = grid.expand(path, str(tmp_path / 'sweep'), seeds=(0, 1))
  assert [r.name for r in runs] == [
      'lora.rank=2,seed=0', 'lora.rank=4,seed=7', 'lora.rank=2,seed=1']
  assert [r.config.seed for r in runs] == [0, 7, 1]
  assert runs[2].command().endswith('--config.lora.rank=2 --config.seed=1')
  assert [r.name for r in grid.expand(path, str(tmp_path))] == [
      'lora.rank=2', 'lora.rank=4,seed=7']  # No SEEDS, no seed axis.


@pytest.mark.parametrize('seeds', [(), (0, 0), ('a',), (True,), 3])
def test_bad_seeds_raise(tmp_path, seeds):
  path = write_config(tmp_path, "add(**{'lora.rank': 2})")
  with pytest.raises(ValueError, match='distinct ints'):
    grid.expand(path, str(tmp_path / 'sweep'), seeds=seeds)


T_2DOF = 4.302652729911275  # t(0.975) with 2 degrees of freedom.


def write_run(sweep_dir, overrides, *, method='lora', test, val=None,
              final=None, losses=(0.7, 0.5, 0.3), majority=0.5,
              examples=1000, params=100):
  """A finished run's files, written by hand as train_and_evaluate would."""
  name = grid.run_name(overrides)
  workdir = os.path.join(sweep_dir, name)
  os.makedirs(workdir)
  config = {'method': method, 'seed': overrides.get('seed', 0),
            'lora.rank': 8, 'lora.alpha': 8.0}
  config.update({k: v for k, v in overrides.items()})
  with open(os.path.join(workdir, runner.RUN_FILE), 'w') as f:
    json.dump({'name': name, 'overrides': overrides, 'config': config,
               'command': f'python -m lorajax.cli.train # {name}'}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, loss in enumerate(losses, 1):
      f.write(json.dumps({'step': 10 * i, 'split': 'train', 'loss': loss,
                          'tokens_seen': 320 * i,
                          'tokens_per_sec': 100.0}) + '\n')
      f.write(json.dumps({'step': 10 * i, 'split': 'validation',
                          'accuracy': (val or test) - 0.01 * (3 - i)}) + '\n')
  final = test if final is None else final
  summary = {
      'metric': 'accuracy', 'steps': 30, 'resumed_from': 0, 'method': method,
      'trainable_params': params, 'trainable_fraction': params / 1e6,
      'best_validation': {'accuracy': val or test}, 'best_validation_step': 20,
      'test': {'accuracy': test}, 'test_step': 20,
      'test_final': {'accuracy': final}, 'test_examples': examples,
      'test_majority_rate': majority, 'tokens_per_sec': 100.0,
      'train_time_s': 1.0, 'adapter_bytes': 4 * params, 'wall_time_s': 2.0}
  with open(os.path.join(workdir, runner.SUMMARY), 'w') as f:
    json.dump(summary, f)


def fake_seed_sweep(sweep_dir):
  """rank 1 and rank 2 (equal within noise), full FT (3 points above on
  every seed) and head-only, three seeds."""
  tests = {'r1': (0.80, 0.82, 0.81), 'r2': (0.81, 0.80, 0.82),
           'full': (0.83, 0.85, 0.84), 'head': (0.70, 0.70, 0.71)}
  for seed in (0, 1, 2):
    write_run(sweep_dir, {'lora.rank': 1, 'seed': seed},
              test=tests['r1'][seed], final=tests['r1'][seed] - 0.01,
              val=0.9, params=100)
    write_run(sweep_dir, {'lora.rank': 2, 'seed': seed},
              test=tests['r2'][seed], val=0.85, params=200)
    write_run(sweep_dir, {'method': 'full', 'seed': seed},
              method='full', test=tests['full'][seed], params=10**6)
    write_run(sweep_dir, {'method': 'head', 'seed': seed},
              method='head', test=tests['head'][seed], params=770)


def test_aggregation_over_seeds_on_a_fake_sweep(tmp_path):
  fake_seed_sweep(str(tmp_path))
  paths = report.write_report(str(tmp_path))
  with open(paths['config_csv'], newline='') as f:
    by = {r['configuration']: r for r in csv.DictReader(f)}
  r1 = by['lora.rank=1']
  assert (r1['n'], r1['seeds']) == ('3', '0 1 2')
  assert float(r1['test_mean']) == pytest.approx(0.81)
  assert float(r1['test_std']) == pytest.approx(0.01)
  half = T_2DOF * 0.01 / 3 ** 0.5
  assert float(r1['test_ci95_low']) == pytest.approx(0.81 - half)
  assert float(r1['test_ci95_high']) == pytest.approx(0.81 + half)
  assert float(r1['test_final_mean']) == pytest.approx(0.80)
  assert float(r1['test_se']) == pytest.approx((0.81 * 0.19 / 1000) ** 0.5)
  with open(paths['md']) as f:
    md = f.read()
  assert 'DEGENERATE' not in md
  # Chosen by validation (rank 1: 0.90), compared paired with full FT:
  # differences -3, -3, -3 points: measurable, zero spread.
  assert 'Best LoRA configuration by mean validation accuracy: `lora.rank=1`' in md
  assert ('best LoRA minus full fine-tuning (LoRA has 0.01% of its trainable '
          'params): -3.0 ± 0.0 points (paired over 3 seeds, 95% CI), a measurable '
          'difference.') in md
  # Rank 1 - rank 2 per seed: -1, +2, -1: the interval holds zero.
  assert ('Rank: 0 of 1 pairs that differ only in rank differ measurably'
          in md)
  assert 'no measurable difference between ranks' in md
  assert '| `lora.rank=1` | 1 | `lora` | 3/3 | 100 | 0.9000 ± 0.0000 |' in md


def test_paired_difference_and_interval():
  d = report.aggregate.stats.paired({0: 0.80, 1: 0.82, 2: 0.81},
                                    {0: 0.81, 1: 0.80, 2: 0.82, 3: 0.9})
  assert d.n == 3 and d.mean == pytest.approx(0.0)
  assert d.half_width == pytest.approx(T_2DOF * 3e-4 ** 0.5 / 3 ** 0.5)
  assert not d.measurable
  one = report.aggregate.stats.paired({0: 0.9}, {0: 0.1})
  assert (one.n, one.half_width, one.measurable) == (1, None, False)


def test_method_column_is_written_once(tmp_path):
  fake_seed_sweep(str(tmp_path))
  paths = report.write_report(str(tmp_path))
  with open(paths['csv'], newline='') as f:
    header = next(csv.reader(f))
  assert header.count('method') == 1 and 'seed' in header


@pytest.mark.parametrize('kind', ['majority', 'flat_loss'])
def test_degenerate_sweep_is_flagged_at_the_top(tmp_path, kind):
  for seed in (0, 1):
    for rank in (1, 2):
      if kind == 'majority':  # Every run predicts the majority class.
        write_run(str(tmp_path), {'lora.rank': rank, 'seed': seed},
                  test=0.35 + 0.001 * rank, majority=0.35, examples=1155)
      else:
        write_run(str(tmp_path), {'lora.rank': rank, 'seed': seed},
                  test=0.6 + 0.01 * seed, losses=(0.69, 0.70, 0.69))
  md = open(report.write_report(str(tmp_path))['md']).read()
  top = md.split('\n- ')[0]
  assert '**DEGENERATE SWEEP**: no run learned the task' in top
  if kind == 'majority':
    assert ('4 of 4 finished runs score at the majority-class rate of the '
            'test set (0.3500 over 1,155 examples)') in top
  else:
    assert 'training loss that did not fall' in top


def test_a_healthy_sweep_has_no_warning(tmp_path):
  fake_seed_sweep(str(tmp_path))
  keys, rows = report.collect(str(tmp_path))
  assert report.verdicts.warnings(rows) == []


def test_plots_and_tables_decode(tmp_path):
  fake_seed_sweep(str(tmp_path))
  paths = report.write_report(str(tmp_path))
  for name in ('metric_vs_rank', 'rank_alpha_heatmap', 'metric_vs_params',
               'learning_curves', 'learning_curves_tokens'):
    pixels = mpimg.imread(paths[name])
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # Not a blank image.
    with open(paths[name][:-4] + '.pdf', 'rb') as f:
      assert f.read(5) == b'%PDF-'
  with open(paths['tex']) as f:
    tex = f.read()
  assert '\\begin{tabular}' in tex and '\\bottomrule' in tex
  assert '$81.0 \\pm 1.0$' in tex  # rank 1's test, in points.
