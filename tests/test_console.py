"""What a run prints: a few readable lines, the library chatter in a file."""

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

from lorajax.training import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An absl/glog INFO record: 'I1130 10:05:12.689242 1404637 file.py:168] ...'.
INFO_RECORD = re.compile(r'^I\d{4} \d\d:\d\d:\d\d\.\d+ ')


def _progress_lines(total, initial=0, **kw):
  out = io.StringIO()
  progress = console.Progress(total, initial, stream=out, tty=False, **kw)
  for step in range(initial + 1, total + 1):
    progress.update(step, loss=0.5, tokens=100, seconds=0.01)
  progress.close()
  return out.getvalue()


def test_progress_off_a_terminal_is_ten_plain_lines():
  text = _progress_lines(400)
  lines = text.splitlines()
  assert '\r' not in text
  assert len(lines) == 10
  assert lines[0].startswith('step  40/400 ( 10%)  loss 0.5000')
  assert 'tokens/s' in lines[0] and 'ETA' in lines[0]
  assert lines[-1].startswith('step 400/400 (100%)')


def test_resumed_progress_spreads_its_lines_over_the_steps_left():
  lines = _progress_lines(100, initial=80).splitlines()
  assert [line.split()[1] for line in lines] == [
      f'{s}/100' for s in (82, 84, 86, 88, 90, 92, 94, 96, 98, 100)]


def test_slow_steps_print_sooner_without_near_repeats():
  out = io.StringIO()
  progress = console.Progress(100, 0, stream=out, tty=False, every_s=1.0)
  for step in range(1, 101):
    progress.update(step, loss=0.5, tokens=10, seconds=0.15)
  steps = [int(line.split()[1].split('/')[0])
           for line in out.getvalue().splitlines()]
  assert steps[0] == 7 and steps[-1] == 100   # 7 steps = 1.05 s of steps
  assert min(b - a for a, b in zip(steps, steps[1:])) >= 5


def test_disabled_progress_prints_nothing_but_evaluations():
  out = io.StringIO()
  progress = console.Progress(10, 0, stream=out, tty=False, enabled=False)
  for step in range(1, 11):
    progress.update(step, loss=0.5, tokens=1, seconds=1.0)
  progress.write('step 10 validation: loss 0.5000')
  assert out.getvalue() == 'step 10 validation: loss 0.5000\n'


def test_capture_logs_sends_info_to_the_file_and_warnings_to_stderr(
    tmp_path):
  # A plain script (no app.run): the root logger has no handler at all.
  script = textwrap.dedent(f"""
      import logging
      from absl import logging as absl_logging
      from lorajax.training import console
      with console.capture_logs({str(tmp_path)!r}) as path:
        absl_logging.info('absl chatter')
        logging.getLogger('orbax').info('orbax chatter')
        absl_logging.warning('a real warning')
        print('for a person')
      logging.warning('after the run')
      print(path)
      """)
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        check=True)
  assert proc.stdout.splitlines() == [
      'for a person', str(tmp_path / console.LOG_FILE)]
  assert 'a real warning' in proc.stderr and 'after the run' in proc.stderr
  assert 'chatter' not in proc.stderr
  log = (tmp_path / console.LOG_FILE).read_text()
  assert 'absl chatter' in log and 'orbax chatter' in log
  assert 'a real warning' in log and 'after the run' not in log


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The console of ``lorajax.cli.train`` on the smoke main job, redirected
  to a file as in CI (not a terminal): ``(lines, workdir)``."""
  workdir = tmp_path_factory.mktemp('console_run')
  out_path = workdir.parent / 'console.txt'
  with open(out_path, 'w', encoding='utf-8') as out:
    subprocess.run(
        [sys.executable, '-m', 'lorajax.cli.train',
         '--config=configs/rt_minilm_lora.py:smoke', f'--workdir={workdir}',
         '--config.progress_bar=true'], cwd=ROOT, stdout=out,
        stderr=subprocess.STDOUT, timeout=600, check=True)
  text = out_path.read_text(encoding='utf-8')
  assert '\r' not in text
  return text.splitlines(), workdir


def test_run_console_is_a_few_readable_lines(tiny_run):
  lines, workdir = tiny_run
  assert len(lines) < 40, '\n'.join(lines)
  assert not [line for line in lines if INFO_RECORD.match(line)]
  assert not [line for line in lines if 'orbax' in line.lower()
              or 'checkpoint_manager' in line]
  # Setup summary first: the run, then the trainable report's counts.
  assert lines[0].startswith('rt_minilm_lora: lora on minilm')
  assert str(workdir / console.LOG_FILE) in lines[0]
  assert lines[1].startswith('trainable params: ')
  # One progress display; evaluation lines.
  assert [l for l in lines if l.startswith('step 6/6 (100%)')]
  assert 'step 3 validation: loss' in '\n'.join(lines)
  assert [l for l in lines if l.startswith('test: loss')]


def test_run_summary_comes_last(tiny_run):
  lines, workdir = tiny_run
  rule = '=' * 64
  assert lines[-1] == rule
  start = len(lines) - 1 - lines[::-1].index(rule, 1)
  summary = lines[start:]
  assert summary[1].startswith('run          rt_minilm_lora')
  assert summary[-2] == f'workdir      {workdir}'


def test_run_log_file_holds_the_library_chatter(tiny_run):
  _, workdir = tiny_run
  log = (workdir / console.LOG_FILE).read_text(encoding='utf-8')
  assert 'checkpoint_manager.py' in log   # Orbax's INFO records.
  assert 'config:' in log and 'trainable params: ' in log
  # The paths each rule matched are logged, not printed.
  assert 'encoder/layer_0/attention/query/kernel' in log
