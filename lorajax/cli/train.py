r"""Trains and evaluates one config: ``python -m lorajax.cli.train``.

  python -m lorajax.cli.train                      # the main job
  python -m lorajax.cli.train --config configs/rt_minilm_full.py \
      --workdir /tmp/full --config.optim.learning_rate=1e-4
  python -m lorajax.cli.train --config configs/rt_minilm_lora.py:smoke

``lorajax-train`` (a console script) is the same command;
``python -m experiments.train`` still runs it.

Without ``--workdir`` the run goes to ``workdirs/<config file name>``. A run
whose workdir holds checkpoints resumes from the newest intact one.
A config with invalid fields, a resume whose run-defining fields changed,
or a workdir another run holds is refused with the reason and status 1;
SIGTERM / Ctrl-C checkpoint the step under way and exit 143 / 130.

On several hosts, start the same command on each with
``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (and
``--config.mode=mesh`` or ``pmap``): ``jax.distributed.initialize`` joins them
before anything else touches the devices. On TPU pods and SLURM clusters JAX
finds these by itself; pass ``--distributed`` alone.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from lorajax.runtime import host_memory
from lorajax.sweeps import runner
from lorajax.training import integrity
from lorajax.training import train
from lorajax.training import validate
from lorajax.training import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/rt_minilm_lora.py', 'Training config file (path[:arg]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for checkpoints and metrics; default '
    'workdirs/<config name>.')

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (implied by '
    '--coordinator).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'HOST:PORT of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Index of this process.')


def default_workdir(config_path: str) -> str:
  """``workdirs/<config file stem>`` for ``configs/x.py:arg``."""
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('workdirs', name)


def main(argv):
  runner.die_with_parent_from_env()  # A sweep's run dies with it.
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    logging.info('process %d of %d', jax.process_index(), jax.process_count())
  if host_memory.active():
    logging.info('host pages kept between steps (%s=%s; LD_PRELOAD=%s)',
                 host_memory.SWITCH, host_memory.ON, os.environ['LD_PRELOAD'])
  try:
    train.train_and_evaluate(_CONFIG.value, workdir)
  except (validate.ConfigError, workdir_lock.WorkdirLocked,
          integrity.WriteFailed) as e:
    # Refused before anything ran, or a checkpoint the disk could not take:
    # the reason and what to do, without a traceback.
    raise SystemExit(f'lorajax-train: {e}') from None


def run() -> None:
  """The ``lorajax-train`` console script.

  With ``LORAJAX_HOST_PAGES=kept``, a CPU run first re-executes itself
  once with lorajax's block cache preloaded, which keeps a step's buffers
  mapped between steps (``lorajax.runtime.host_memory``).
  """
  host_memory.relaunch()
  app.run(main)


if __name__ == '__main__':
  run()
