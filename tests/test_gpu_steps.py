"""``experiments.bench.gpu_steps``, the lent-GPU script, run tiny on the CPU:
both step kinds compile, train and report what its table prints."""

import types

import jax
import numpy as np
import pytest

from experiments.bench import gpu_steps


@pytest.mark.parametrize('kind', gpu_steps.KINDS)
def test_tiny_step_runs_and_reports(kind):
  m = gpu_steps.measure('smollm2', kind, batch=2, seq=16, steps=3, tiny=True,
                        remat='none', peak=1.0)
  # LoRA q/v at rank 8 on 2 layers: q 64->64 and v 64->32 (2 KV heads x 16).
  lora = 2 * ((64 * 8 + 8 * 64) + (64 * 8 + 8 * 32))
  if kind == 'lora':
    assert m['trainable_params'] == lora
  else:
    assert m['trainable_params'] > 20 * lora
  assert len(m['losses']) == 5 and np.all(np.isfinite(m['losses']))
  assert m['losses'][-1] < m['losses'][0]            # it trains
  assert m['xla_flops_per_step'] > 0 and 0 < m['mfu']
  assert m['tokens_per_s'] == pytest.approx(
      32 / (m["step_ms_median"] / 1e3), rel=1e-2)   # ms rounded to 0.01
  assert gpu_steps.row(m).startswith(f'| smollm2 | {kind} | 2×16 |')


def test_full_step_does_more_work_than_lora():
  flops = {kind: gpu_steps.measure('smollm2', kind, batch=2, seq=16, steps=1,
                                   tiny=True, remat='none',
                                   peak=1.0)['xla_flops_per_step']
           for kind in gpu_steps.KINDS}
  assert flops['lora'] < flops['full']


def test_peak_is_the_flag_or_the_table_or_an_error():
  h200 = types.SimpleNamespace(device_kind='NVIDIA H200')
  assert gpu_steps.peak_tflops(h200, None) == 989.5
  assert gpu_steps.peak_tflops(h200, 500.0) == 500.0
  with pytest.raises(ValueError, match="device_kind='cpu'; pass --peak"):
    gpu_steps.peak_tflops(jax.devices('cpu')[0], None)
  with pytest.raises(ValueError, match="kind='sgd'"):
    gpu_steps.build('smollm2', 'sgd', 1, 8, tiny=True)
