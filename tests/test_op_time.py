"""Where a step's time goes: HLO categories and the traced op-time split."""

import jax
import jax.numpy as jnp
import pytest

from lorajax.profiling import op_time
from lorajax.profiling import step_profile
from toy_models import load_config


def _attention_like(w, x):
  h = jax.nn.gelu(x @ w)                                  # dense matmul
  q = h.reshape(4, 64, 256)
  s = jnp.einsum('bqd,bkd->bqk', q, q)                    # batched matmul
  return jnp.sum(jax.nn.softmax(s, -1)) + jnp.sum(h.T * 2.0)


def _compiled(f, *args):
  return jax.jit(jax.grad(f)).lower(*args).compile()


def test_categories_name_dense_and_batched_matmuls():
  w, x = jnp.ones((256, 256)), jnp.ones((256, 256))
  kinds = op_time.categories(_compiled(_attention_like, w, x).as_text())
  assert set(kinds.values()) <= set(op_time.CATEGORIES)
  assert 'matmul' in kinds.values()
  assert 'batched matmul' in kinds.values()


def test_breakdown_sums_categories_and_finds_the_matmuls():
  w, x = jnp.full((512, 512), 1e-3), jnp.ones((512, 512))
  matmuls = lambda w, x: jnp.sum(((x @ w) @ w) @ w)
  compiled = _compiled(matmuls, w, x)
  r = op_time.breakdown(compiled.as_text(), lambda: compiled(w, x), steps=3)
  assert set(r['ms']) == set(op_time.CATEGORIES)
  assert r['op_ms'] == pytest.approx(sum(r['ms'].values()))
  # Six 512^3 products and little else: the matmuls dominate op time.
  assert r['ms']['matmul'] > 0.5 * r['op_ms'] > 0
  assert r['top'][0][1] == 'matmul'


def test_async_dots_count_until_their_end_event():
  """Eigen dots complete after their start event: their time runs to the
  ``end:`` event (the first event alone put these at ~12% of the step)."""
  import lorajax
  w, x = jnp.full((1024, 1024), 1e-3), jnp.ones((2048, 1024))
  f = jax.jit(lambda w, x: jnp.sum(((x @ w) @ w) @ w),
              compiler_options=lorajax.compiler_options())
  compiled = f.lower(w, x).compile()
  r = op_time.breakdown(compiled.as_text(), lambda: compiled(w, x), steps=3)
  assert r['ms']['matmul'] >= 0.6 * r['mean_wall_ms']
  # Shared instants are not counted twice: op time stays near wall time
  # (both means over the traced steps: one slow step moves both).
  assert r['op_ms'] <= 1.25 * r['mean_wall_ms']
  assert r['concurrency'] >= 1.0


def test_ops_inside_a_scan_body_are_counted():
  ws, x = jnp.full((3, 512, 512), 1e-3), jnp.ones((256, 512))
  body = lambda c, w: (jnp.tanh(c @ w), None)
  f = jax.jit(lambda ws, x: jnp.sum(jax.lax.scan(body, x, ws)[0]))
  compiled = f.lower(ws, x).compile()
  r = op_time.breakdown(compiled.as_text(), lambda: compiled(ws, x), steps=2)
  assert r['ms']['matmul'] > 0    # The products live in the while body.
  assert r['ms']['elementwise'] > 0


def test_profile_row_and_table_say_where_the_time_goes():
  config = load_config('rt_minilm_lora')
  row = step_profile.measure(config, 4, steps=2, warmup=1, where=True)
  where = row['where']
  assert where['op_ms'] > 0 and where['ms']['matmul'] > 0
  text = step_profile.markdown([row], step_profile.fit_memory([row]), 'demo')
  assert '## Where the time goes' in text
  assert '| matmul |' in text and '| batch 4 |' in text
  assert '| idle (no op running) |' in text


def test_overlapping_ops_share_the_wall_time_they_overlap():
  share, whole = op_time._share_wall_time(
      [(0.0, 10.0, 'a'), (5.0, 15.0, 'b'), (20.0, 22.0, 'a')])
  assert share == pytest.approx({'a': 9.5, 'b': 7.5})   # 5 + 2.5 + 2
  assert whole == pytest.approx(22.0)                   # 10 + 10 + 2
  events = [{'name': 'dot.1', 'ts': 0.0, 'dur': 1.0},
            {'name': 'end: dot.1', 'ts': 30.0, 'dur': 0.5},
            {'name': 'fusion', 'ts': 31.0, 'dur': 4.0}]
  assert sorted(op_time._op_intervals(
      events, {'dot.1': 'matmul', 'fusion': 'elementwise'})) == [
          (0.0, 30.5, 'dot.1'), (31.0, 35.0, 'fusion')]


def test_a_lost_end_event_does_not_shift_the_pairing():
  """The profiler can drop events; an op's end belongs to its own run."""
  events = [{'name': 'dot.1', 'ts': 0.0, 'dur': 1.0},          # end lost
            {'name': 'dot.1', 'ts': 100.0, 'dur': 1.0},
            {'name': 'end: dot.1', 'ts': 150.0, 'dur': 0.0}]
  assert sorted(op_time._op_intervals(events, {'dot.1': 'matmul'})) == [
      (0.0, 1.0, 'dot.1'), (100.0, 150.0, 'dot.1')]


def test_the_fused_cpu_attention_is_its_own_category():
  from lorajax.models import ops
  from lorajax.runtime import cpu_attention
  if jax.default_backend() != 'cpu' or not cpu_attention.available():
    pytest.skip('no fused CPU attention here')
  q = jnp.ones((2, 16, 2, 8))
  mask = jnp.ones((2, 16), bool)
  loss = lambda q: jnp.sum(ops.attention(q, q, q, mask))
  kinds = op_time.categories(_compiled(loss, q).as_text())
  assert list(kinds.values()).count('fused attention') == 2   # fwd, bwd
  assert 'batched matmul' not in kinds.values()
