r"""Peak memory, step time and FLOPs of a train step, per batch size.

  python -m lorajax.cli.profile --config configs/rt_minilm_lora.py \
      --out /tmp/profile_lora
  python -m lorajax.cli.profile --config configs/rt_minilm_full.py \
      --batch_sizes 1,2,4,8,16,32 --out /tmp/profile_full

Each batch size is measured in a fresh subprocess (its peak RSS is its own
``VmHWM``); ``--config.k=v`` flags apply to each. Writes ``profile.md``,
``profile.json`` and ``profile.png`` to ``--out`` and prints the table;
``--where`` adds where each step's time goes (XLA op time by category:
matmuls, attention's batched matmuls, reductions, elementwise, copies);
``--report-only`` redraws them from ``profile.json``. ``lorajax-profile`` (a
console script) is the same command.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from lorajax.profiling import step_profile
from lorajax.runtime import host_memory

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/rt_minilm_lora.py', 'Training config file '
    '(path[:arg]).', lock_config=True)
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', '1,2,4,8,16,32,64',
                                 'Batch sizes to measure.')
_OUT = flags.DEFINE_string('out', None, 'Folder for profile.md/.json/.png; '
                           'default workdirs/profile_<config name>.')
_STEPS = flags.DEFINE_integer(
    'steps', 20, 'Timed steps per batch size (5 left small-batch medians '
    'noisy on a 2-core CPU).')
_REPORT_ONLY = flags.DEFINE_bool('report-only', False, 'Only rewrite '
                                  'profile.md/.png from --out/profile.json.')
_WHERE = flags.DEFINE_bool(
    'where', False, 'Also trace the timed steps with jax.profiler and add '
    '"where the time goes" (XLA op time by category) to profile.md.')
_CHILD = flags.DEFINE_integer('child_batch_size', None, 'Internal: measure '
                              'this one batch size and print the result.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CHILD.value is not None:
    row = step_profile.measure(_CONFIG.value, _CHILD.value, steps=_STEPS.value,
                               where=_WHERE.value)
    print(step_profile.RESULT_PREFIX + json.dumps(row), flush=True)
    return
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  out = _OUT.value or os.path.join('workdirs', f'profile_{name}')
  path = os.path.join(out, 'profile.json')
  title = f'Train step profile: {name} (method {_CONFIG.value.method})'
  if _REPORT_ONLY.value:
    with open(path, encoding='utf-8') as f:
      rows = json.load(f)['rows']
  else:
    os.makedirs(out, exist_ok=True)
    overrides = config_flags.get_override_values(flags.FLAGS['config'])
    rows = step_profile.profile(config_file, overrides,
                                [int(b) for b in _BATCH_SIZES.value],
                                echo=lambda s: print(s, flush=True),
                                where=_WHERE.value)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'config': config_file, 'overrides': overrides,
                 'rows': rows}, f, indent=2)
  fit = step_profile.fit_memory(rows)
  text = step_profile.markdown(rows, fit, title)
  with open(os.path.join(out, 'profile.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  step_profile.plot(rows, fit, os.path.join(out, 'profile.png'), title)
  print(text)
  print(f'wrote {out}/profile.md, profile.json, profile.png')


def run() -> None:
  """The ``lorajax-profile`` console script.

  With ``LORAJAX_HOST_PAGES=kept``, a CPU run first re-executes itself
  once with lorajax's block cache preloaded, which keeps a step's buffers
  mapped between steps (``lorajax.runtime.host_memory``).
  """
  host_memory.relaunch()
  app.run(main)


if __name__ == '__main__':
  run()
