"""The PyTorch + transformers + PEFT side of ``python -m experiments.bench peft``.

One process that serves ``setup`` and ``step`` for a row (see
``experiments.bench.bench_inputs``):

- ``bert`` / ``flaxbert`` rows: a ``BertForSequenceClassification`` built
  from a ``BertConfig`` and the driver's state dict, classifier trained
  (``modules_to_save``);
- ``llama`` rows: ``LlamaForCausalLM.from_pretrained`` of the driver's
  checkpoint, ``labels=input_ids`` (next-token loss), ``use_cache=False``;
  LoRA on ``q_proj``/``v_proj`` or PEFT's ``'all-linear'``. With ``remat``
  the model recomputes activations (``activation_checkpointing_enable()``,
  transformers 5's name of ``gradient_checkpointing_enable``,
  non-reentrant).

The step is the standard PyTorch one, timed around itself:

  with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
    loss = model(**batch).loss
  loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

``torch_compile`` runs ``torch.compile(model)`` instead of ``model`` (the
compile happens in the first step). Dropout is off everywhere (hidden,
attention, LoRA), as in the lorajax step; ``torch.set_num_threads`` is the
machine's core count (or the request's ``torch_threads``). Imports neither JAX nor lorajax, so its memory is
PyTorch's alone.

Run by ``experiments.bench.bench_peft``; by hand:

  echo '{"cmd": "stats"}' | python -m experiments.bench.peft_worker
"""

from __future__ import annotations

import os
import time
from typing import Any

import peft
from safetensors import safe_open
import torch
import transformers

from experiments.bench import worker_protocol

# The kernels of each ``targets`` choice, as a PEFT user writes them. BERT's
# "all" is every dense layer of the encoder blocks (not the pooler).
TARGET_MODULES = {
    'bert': {
        'qv': ['query', 'value'],
        'all': (r'.*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|'
                r'attention\.output\.dense|intermediate\.dense|output\.dense)'),
    },
    'llama': {'qv': ['q_proj', 'v_proj'], 'all': 'all-linear'},
}
# PEFT wraps the model: module names start with this.
_PEFT_PREFIX = 'base_model.model.'


def _bert(req: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
  config = transformers.BertConfig(
      vocab_size=req['vocab_size'], hidden_size=req['hidden_size'],
      num_hidden_layers=req['num_layers'],
      num_attention_heads=req['num_heads'],
      intermediate_size=req['intermediate_size'],
      max_position_embeddings=req['max_position'],
      num_labels=req['num_labels'], hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  model = transformers.BertForSequenceClassification(config)
  with safe_open(req['weights'], framework='pt') as f, torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(f.get_tensor(name))
    batch = {
        'input_ids': f.get_tensor('batch.input_ids').long(),
        'attention_mask': f.get_tensor('batch.attention_mask').long(),
        'labels': f.get_tensor('batch.label').long(),
    }
  return model, batch


def _llama(req: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
  model = transformers.LlamaForCausalLM.from_pretrained(
      req['checkpoint'], dtype=torch.float32)
  with safe_open(req['inputs'], framework='pt') as f:
    ids = f.get_tensor('batch.input_ids').long()
    batch = {'input_ids': ids,
             'attention_mask': f.get_tensor('batch.attention_mask').long(),
             'labels': ids.clone(), 'use_cache': False}
  return model, batch


class Runner:
  """Holds the model, optimizer and batch between requests."""

  def __init__(self):
    self.model = None
    self.forward = None
    self.opt = None
    self.batch = None
    self.bf16 = False

  def handle_setup(self, req: dict[str, Any]) -> dict[str, Any]:
    """Builds the PEFT model and the AdamW optimizer; runs nothing."""
    t0 = time.perf_counter()
    torch.set_num_threads(req.get('torch_threads') or os.cpu_count() or 1)
    torch.manual_seed(0)
    family = 'llama' if req['model'] == 'llama' else 'bert'
    model, self.batch = (_llama if family == 'llama' else _bert)(req)
    if req.get('remat'):
      model.activation_checkpointing_enable()
    lora = peft.LoraConfig(
        r=req['rank'], lora_alpha=req['alpha'], lora_dropout=0.0,
        target_modules=TARGET_MODULES[family][req['targets']],
        modules_to_save=['classifier'] if family == 'bert' else None)
    model = peft.get_peft_model(model, lora)
    adapted = 0
    a_file = req['inputs'] if family == 'llama' else req['weights']
    with safe_open(a_file, framework='pt') as f, torch.no_grad():
      for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
          hf = name.removeprefix(_PEFT_PREFIX)
          module.lora_A['default'].weight.copy_(f.get_tensor(f'lora.{hf}.A'))
          module.lora_B['default'].weight.zero_()
          adapted += 1
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=req['learning_rate'],
                                 weight_decay=req['weight_decay'])
    self.model = model
    self.forward = torch.compile(model) if req.get('torch_compile') else model
    self.bf16 = req['dtype'] == 'bfloat16'
    return {'trainable_params': sum(p.numel() for p in trainable),
            'adapted_modules': adapted,
            'setup_s': round(time.perf_counter() - t0, 2),
            'threads': torch.get_num_threads(),
            'attn_implementation': model.config._attn_implementation,  # pylint: disable=protected-access
            'versions': {'torch': torch.__version__,
                         'transformers': transformers.__version__,
                         'peft': peft.__version__}}

  def handle_step(self, req: dict[str, Any]) -> dict[str, Any]:
    """One train step, timed around forward, backward and the update."""
    del req
    t0 = time.perf_counter()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
      loss = self.forward(**self.batch).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    return {'step_s': step_s, 'loss': float(loss.detach())}


def main() -> None:
  runner = Runner()
  worker_protocol.serve({'setup': runner.handle_setup,
                         'step': runner.handle_step})


if __name__ == '__main__':
  main()
