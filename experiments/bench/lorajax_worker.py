"""The lorajax side of ``python -m experiments.bench peft``: one process.

Serves ``setup`` (build the LoRA train step of
``experiments.bench.bench_core`` on the weights, adapters and batch that the
driver wrote to a safetensors file) and ``step`` (run one step, report its
wall time, measured around the step and ``block_until_ready``). See
``experiments.bench.worker_protocol``.

Run by ``experiments.bench.bench_peft``; by hand:

  echo '{"cmd": "stats"}' | python -m experiments.bench.lorajax_worker
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open

import lorajax
from experiments.bench import bench_core
from experiments.bench import worker_protocol
from lorajax import spec as spec_lib
from lorajax.models import bert as bert_lib
from lorajax.models import bert_loading

PyTree = Any

# What a user writes to target the kernels of each ``targets`` choice.
VARIANT_OF_TARGETS = {'qv': 'lora', 'all': 'lora_all'}


def _hf_key(flax_key: str) -> str:
  """The key of a ``BertForSequenceClassification`` tensor."""
  return flax_key if flax_key.startswith('classifier') else 'bert.' + flax_key


def load_params(path: str, config: bert_lib.BertConfig) -> PyTree:
  """Reads ``Bert`` parameters from Hugging Face tensors, one at a time.

  Linear weights ``[out, in]`` become kernels ``[in, out]``. Tensors are read
  lazily so that loading holds one tensor beyond the parameters.
  """
  params: dict[str, Any] = {}
  with safe_open(path, framework='numpy') as f:
    for flax_path, hf in bert_loading.hf_key_map(config).items():
      value = f.get_tensor(_hf_key(hf))
      if flax_path.endswith('/kernel'):
        value = value.T
      spec_lib.set_by_path(params, flax_path,
                           jnp.asarray(value, config.param_dtype))
  return params


def load_adapters(path: str, adapters: PyTree,
                  config: bert_lib.BertConfig) -> PyTree:
  """Replaces each adapter's ``a`` by the file's PEFT ``lora_A`` (``a.T``)."""
  hf_of = bert_loading.hf_key_map(config)
  out: dict[str, Any] = {}
  with safe_open(path, framework='numpy') as f:
    for leaf_path, value in spec_lib.flatten_paths(adapters):
      kernel_path, name = leaf_path.rsplit('/', 1)
      if name == 'a':
        module = hf_of[kernel_path].removesuffix('.weight')
        value = jnp.asarray(f.get_tensor(f'lora.{module}.A').T)
      spec_lib.set_by_path(out, leaf_path, value)
  return out


class Runner:
  """Holds the compiled step, its state and the batch between requests."""

  def __init__(self):
    self.setup = None
    self.compiled = None
    self.state = None
    self.batch = None

  def handle_setup(self, req: dict[str, Any]) -> dict[str, Any]:
    """Builds and compiles the step; runs nothing."""
    t0 = time.perf_counter()
    config = bert_lib.BertConfig(
        vocab_size=req['vocab_size'], hidden_size=req['hidden_size'],
        num_layers=req['num_layers'], num_heads=req['num_heads'],
        intermediate_size=req['intermediate_size'],
        num_labels=req['num_labels'], hidden_dropout=0.0,
        attention_dropout=0.0)
    variant = VARIANT_OF_TARGETS[req['targets']]
    with safe_open(req['weights'], framework='numpy') as f:
      batch = {k: jnp.asarray(f.get_tensor(f'batch.{k}'))
               for k in ('input_ids', 'attention_mask', 'label')}
    params = load_params(req['weights'], config)
    spec = bench_core.lora_spec(variant)
    adapters = load_adapters(
        req['weights'], lorajax.init(spec, params, jax.random.key(0)), config)
    self.setup = bench_core.make_setup(variant, config, batch, params=params,
                                       adapters=adapters)
    del params, adapters
    self.batch = batch
    self.state = self.setup.state
    self.compiled = self.setup.step.lower(self.state, self.setup.frozen,
                                          batch).compile()
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return {'trainable_params': self.setup.trainable_params,
            'flops_per_step': float(cost['flops']),
            'setup_s': round(time.perf_counter() - t0, 2),
            'versions': {'jax': jax.__version__}}

  def handle_step(self, req: dict[str, Any]) -> dict[str, Any]:
    """One train step; its wall time includes waiting for the result."""
    del req
    t0 = time.perf_counter()
    self.state, loss = self.compiled(self.state, self.setup.frozen,
                                     self.batch)
    loss = jax.block_until_ready(loss)
    step_s = time.perf_counter() - t0
    return {'step_s': step_s, 'loss': float(loss)}


def main() -> None:
  runner = Runner()
  worker_protocol.serve({'setup': runner.handle_setup,
                         'step': runner.handle_step})


if __name__ == '__main__':
  main()
