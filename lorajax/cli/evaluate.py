r"""Scores a finished run's adapter: ``python -m lorajax.cli.evaluate``.

  python -m lorajax.cli.evaluate --workdir /tmp/lorajax_main
  python -m lorajax.cli.evaluate --workdir /tmp/run --split validation \
      --step best

The run's config is read from its checkpoint (no override is typed again);
the base model is loaded, the adapter put on it, and only ``--split`` of the
data is read. ``--step`` is a step number, ``best`` (the best validation
step's adapter, what ``summary.json``'s ``test`` scored) or, by default, the
latest checkpoint. Prints one line of metrics and their JSON.
"""

import json

from absl import app
from absl import flags

from lorajax.runtime import host_memory
from lorajax.training import console
from lorajax.training import finished
from lorajax.training import metrics as metrics_lib
from lorajax.training import saved_run

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s workdir.',
                               required=True)
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'validation', 'test'],
                           'The split to score.')
_STEP = flags.DEFINE_string('step', None, 'Checkpoint step, or "best"; '
                            'default the latest.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    step = saved_run.parse_step(_STEP.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with console.capture_logs(_WORKDIR.value):   # Library logs to info.log.
    config = saved_run.run_config(_WORKDIR.value, step)
    metrics = finished.evaluate_checkpoint(config, _WORKDIR.value,
                                           _SPLIT.value, step)
  print(f'{config.name} {_SPLIT.value} (step {step or "latest"}): '
        f'{metrics_lib.format_metrics(metrics)}')
  print(json.dumps({'split': _SPLIT.value, 'step': step, **metrics}))


def run() -> None:
  """The ``lorajax-evaluate`` console script.

  With ``LORAJAX_HOST_PAGES=kept``, a CPU run first re-executes itself
  once with lorajax's block cache preloaded, which keeps a step's buffers
  mapped between steps (``lorajax.runtime.host_memory``).
  """
  host_memory.relaunch()
  app.run(main)


if __name__ == '__main__':
  run()
