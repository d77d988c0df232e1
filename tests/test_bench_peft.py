"""``python -m experiments.bench peft``: every kind of row runs, and lorajax
and PEFT compute the same losses on it.

Tiny shapes, one warm-up and one timed step per contestant (two losses
each), so nothing here is a timing; what is asserted is what a reader of
the table relies on: the two frameworks trained the same model on the same
batch (same trainable count, same losses step after step), the ratios and
utilization are there, and the flags refuse what does not exist.
"""

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

pytest.importorskip('peft')
pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

# pylint: disable=g-import-not-at-top
from experiments.bench import bench_inputs
from experiments.bench import bench_peft
from experiments.bench import flax_bert
from experiments.bench import gemm_ceiling
from experiments.bench import worker_protocol
from lorajax.runtime import host_memory

TINY_BERT = bench_inputs.BertShape(32, 2, 4, 64, batch_size=2, seq_len=8,
                                   vocab_size=100, max_position=16)
TINY_LLAMA = bench_inputs.LlamaShape(32, 2, 4, 2, 8, 64, 128, batch_size=2,
                                     seq_len=8)
# float32: the same math in both frameworks (one AdamW step in between).
F32_TOL = 1e-5
# bfloat16 compute on both sides rounds differently (8-bit mantissa):
# measured 1e-3 to 1e-2 on these losses (~4.6 and ~0.7).
BF16_TOL = 5e-2


# A fixed ceiling: utilization is computed against it (the measured one is
# checked by test_run_measures_the_ceiling_before_and_after).
CEILINGS = {'float32': {'gflops_median': 1.0},
            'bfloat16': {'gflops_median': 1.0}}


def _run_row(row, tmp_path, **kw):
  return bench_peft.run_row(row, reps=1, warmup=1, workdir=str(tmp_path),
                            ceilings=CEILINGS, torch_threads=1,
                            log=lambda s: None, **kw)


def _check_row(r, contestants, tol):
  assert set(r['results']) == set(contestants), r['skipped']
  peft = r['results']['peft']
  assert len(peft['losses']) == 2
  assert np.all(np.isfinite(peft['losses']))
  for label in contestants:
    m = r['results'][label]
    assert m['trainable_params'] == peft['trainable_params'], label
    assert m['step_ms_median'] > 0 and m['peak_rss_mb'] > 0
    assert m['utilization'] > 0, label
    if label != 'peft':
      assert m['max_loss_diff'] <= tol, (label, m['losses'], peft['losses'])
      assert m['step_ratio'] > 0 and m['rss_ratio'] > 0
  assert r['flops_per_step'] > 0


def test_run_measures_the_ceiling_before_and_after(monkeypatch):
  """One whole run of a BERT row, with three steps a call and an optional
  contestant that fails (a PEFT+compile worker given a missing file): the
  ceiling is measured before and after, every contestant matches PEFT's
  losses, the failing one is dropped with its reason, and the table and
  notes show it all."""
  row = bench_inputs.Row('tiny', 'bert', TINY_BERT, 'qv')
  broken = bench_peft.Contestant(
      'peft+compile', bench_peft.PEFT_WORKER,
      {'torch_compile': True, 'weights': '/nonexistent/missing.safetensors'},
      optional=True)
  real = bench_peft.contestants
  monkeypatch.setattr(bench_peft, 'contestants',
                      lambda row, torch_compile, **kw: real(
                          row, torch_compile=False, **kw) + [broken])
  result = bench_peft.run([row], reps=1, warmup=1, torch_compile=False,
                          gemm_size=64, gemm_reps=2, torch_threads=1,
                          steps_per_call=3, log=lambda s: None)
  ceiling = result['ceilings']['float32']
  assert ceiling['gflops_median'] == max(ceiling['start'], ceiling['end']) > 0
  (r,) = result['rows']
  assert r['ceiling_gflops'] == ceiling['gflops_median']
  label = bench_peft.per_call_label(3)
  _check_row(r, ('lorajax', label, 'peft'), F32_TOL)
  assert r['results']['lorajax']['utilization'] == gemm_ceiling.utilization(
      flops=r['flops_per_step'],
      step_s=r['results']['lorajax']['step_ms_median'] / 1e3,
      ceiling_gflops=ceiling['gflops_median'])
  # The shipped BERT reads [CLS] from a one-query last layer; PEFT's step
  # runs that layer for every token, and its utilization counts that work.
  assert r['reference_flops_per_step'] > r['flops_per_step']
  assert r['results']['peft']['utilization'] == gemm_ceiling.utilization(
      flops=r['reference_flops_per_step'],
      step_s=r['results']['peft']['step_ms_median'] / 1e3,
      ceiling_gflops=ceiling['gflops_median'])
  # Three steps a call: two calls of three steps, the first two compared
  # with PEFT's.
  assert len(r['results'][label]['losses']) == 6
  np.testing.assert_allclose(r['results'][label]['losses'][:2],
                             r['results']['lorajax']['losses'], atol=F32_TOL)
  # The optional contestant that failed is named with its reason.
  assert 'missing.safetensors' in r['skipped']['peft+compile']
  lines = bench_peft.table(result).splitlines()
  assert len(lines) == 2 + 3 and lines[2].startswith('| tiny/qv | 2×8 |')
  notes = bench_peft.notes(result)
  assert notes[0].startswith('GEMM ceiling float32')
  assert any('peft+compile' in n and 'missing.safetensors' in n
             for n in notes), notes


@pytest.mark.parametrize('row,contestants,tol', [
    pytest.param(bench_inputs.Row('tiny', 'flaxbert', TINY_BERT, 'all'),
                 ('lorajax', 'lorajax plain jit', 'peft'), F32_TOL,
                 id='own_flax_bert_both_jits'),
    pytest.param(bench_inputs.Row('tiny', 'llama', dataclasses.replace(
        TINY_LLAMA, batch_size=1, seq_len=16, remat=True), 'all'),
                 ('lorajax', 'peft'), F32_TOL,
                 id='llama_all_linear_remat_vs_checkpointing'),
    pytest.param(bench_inputs.Row('tiny', 'bert', TINY_BERT, 'qv',
                                  'bfloat16'),
                 ('lorajax', 'peft'), BF16_TOL, id='bert_bf16_vs_autocast'),
    pytest.param(bench_inputs.Row('tiny', 'llama', TINY_LLAMA, 'qv',
                                  'bfloat16'),
                 ('lorajax', 'peft'), BF16_TOL, id='llama_bf16_vs_autocast'),
])
def test_row_matches_peft(row, contestants, tol, tmp_path):
  r = _run_row(row, tmp_path)
  _check_row(r, contestants, tol)
  assert r['remat'] == row.remat
  if row.dtype == 'bfloat16':  # The compute really was bfloat16.
    assert r['results']['lorajax']['losses'] != r['results']['peft']['losses']


def test_peft_with_torch_compile_is_a_second_anchor(tmp_path):
  r = _run_row(bench_inputs.Row('tiny', 'llama', TINY_LLAMA, 'all'), tmp_path,
               torch_compile=True)
  # The float32 Llama row (LoRA on every block Linear). torch.compile runs
  # here (a C++ compiler is on the machine); where it cannot, the row drops
  # it and names the reason (test_run_measures_the_ceiling_before_and_after).
  _check_row(r, ('lorajax', 'peft', 'peft+compile'), F32_TOL)
  lorajax = r['results']['lorajax']
  assert lorajax['step_ratio_compiled'] == round(
      lorajax['step_ms_median']
      / r['results']['peft+compile']['step_ms_median'], 3)


def test_flax_bert_reads_every_hf_tensor_it_names(tmp_path):
  path = str(tmp_path / 'bert.safetensors')
  tensors = bench_inputs.make_bert_tensors(TINY_BERT, rank=8)
  safetensors_numpy.save_file(tensors, path)
  model = flax_bert.FlaxBert(
      hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
      vocab_size=100, max_position=16)
  params = flax_bert.load_params(model, path)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  keys = {flax_bert.hf_key('/'.join(k.key for k in p)) for p, _ in leaves}
  weights = {k for k in tensors if not k.startswith(('lora.', 'batch.'))}
  assert keys == weights
  kernel = params['encoder_layer_1']['attention_self']['value']['kernel']
  np.testing.assert_array_equal(
      kernel, tensors['bert.encoder.layer.1.attention.self.value.weight'].T)


def test_flax_bert_refuses_a_misshaped_tensor(tmp_path):
  path = str(tmp_path / 'bert.safetensors')
  safetensors_numpy.save_file(bench_inputs.make_bert_tensors(TINY_BERT, 8),
                              path)
  wider = flax_bert.FlaxBert(hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64, vocab_size=101,
                             max_position=16)
  with pytest.raises(ValueError, match='word_embeddings.weight has shape'):
    flax_bert.load_params(wider, path)


def test_rows_cross_sizes_targets_dtypes_and_refuse_unknown_names():
  rows = bench_inputs.rows(['minilm', 'smollm2_2k'], ['qv'],
                           ['float32', 'bfloat16'])
  assert [r.name for r in rows] == ['minilm/qv', 'minilm/qv/bf16',
                                    'smollm2_2k/qv', 'smollm2_2k/qv/bf16']
  assert rows[2].shape.remat and rows[2].tokens == 2048
  with pytest.raises(ValueError, match="'gpt2' is not one of"):
    bench_inputs.rows(['gpt2'], ['qv'], ['float32'])
  with pytest.raises(ValueError, match="targets='kv'"):
    bench_inputs.Row('tiny', 'bert', TINY_BERT, 'kv')
  with pytest.raises(ValueError, match="dtype='float16'"):
    bench_inputs.Row('tiny', 'bert', TINY_BERT, 'qv', 'float16')
  with pytest.raises(TypeError, match='needs a LlamaShape'):
    bench_inputs.Row('tiny', 'llama', TINY_BERT, 'qv')


def test_llama_checkpoint_is_what_transformers_and_lorajax_load(tmp_path):
  from lorajax import models  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  bench_inputs.write_llama_checkpoint(TINY_LLAMA, str(tmp_path))
  ids = np.array([[3, 17, 90, 4, 55]], np.int32)
  ours = models.load(str(tmp_path))
  assert ours.config.rope_base == TINY_LLAMA.rope_base
  assert ours.config.tie_embeddings
  theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
  with torch.no_grad():
    want = theirs(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(ours.apply(ours.params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gemm_ceiling_and_utilization():
  m = gemm_ceiling.measure('float32', size=32, reps=2)
  assert m['gflops_median'] > 0 and m['gflops_max'] >= m['gflops_median']
  assert gemm_ceiling.utilization(flops=2e9, step_s=0.5,
                                  ceiling_gflops=8.0) == 0.5
  with pytest.raises(ValueError, match="dtype='int8'"):
    gemm_ceiling.measure('int8')
  with pytest.raises(ValueError, match='step_s=0'):
    gemm_ceiling.utilization(flops=1.0, step_s=0, ceiling_gflops=1.0)


def test_worker_error_names_unknown_model():
  with worker_protocol.Worker(
      [sys.executable, '-m', bench_peft.LORAJAX_WORKER], 'lorajax') as w:
    with pytest.raises(worker_protocol.WorkerError,
                       match="model='gpt2'; expected one of"):
      w.call('setup', model='gpt2')


def test_host_pages_decide_which_workers_preload_the_block_cache():
  if not (shutil.which(os.environ.get('CC') or 'cc') or shutil.which('gcc')):
    pytest.skip('no C compiler to build the block cache')
  row = bench_inputs.Row('tiny', 'bert', TINY_BERT, 'qv')
  kept = {c.label: host_memory.preloaded(c.env) for c in
          bench_peft.contestants(row, torch_compile=False, host_pages='both')}
  assert kept == {'lorajax': True, 'lorajax glibc default': False,
                  'peft': False, 'peft kept pages': True}
  default = bench_peft.contestants(row, torch_compile=False,
                                   host_pages='default')
  assert [host_memory.preloaded(c.env) for c in default] == [False, False]
  with pytest.raises(ValueError, match="host_pages='always'"):
    bench_peft.contestants(row, torch_compile=False, host_pages='always')
