"""partition / combine / labels / optimizer / count on any pytree.

Lists, tuples, NamedTuples, registered dataclasses and ``nnx.State`` must
round-trip exactly, and the training pieces must train only what the spec
says. Tiny literal trees; CPU; seconds.
"""

import logging
import re
from typing import NamedTuple

import flax
from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import LoraSpec


def _w(*shape, fill=1.0):
  return np.full(shape, fill, np.float32)


class Pair(NamedTuple):
  w: object
  b: object


@flax.struct.dataclass
class Layer:
  w: object
  b: object
  name: str = flax.struct.field(pytree_node=False, default='layer')


def _state():
  _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  return state


TRAIN_B = LoraSpec([(r'(.*/)?(b|bias)(/value)?', 'train'),
                    (r'.*', 'freeze')])
# name -> (params, the regex of the leaves to train).
CASES = {
    'list': ([_w(2), _w(3)], r'1'),
    'tuple': ((_w(2), {'b': _w(3)}), r'1/b'),
    'namedtuple': (Pair(w=_w(2, 2), b=_w(2)), r'b'),
    'struct_dataclass': (Layer(w=_w(2, 2), b=_w(2), name='x'), r'w'),
    'dict_of_list': ({'layers': [{'w': _w(2, 2), 'b': _w(2)},
                                 {'w': _w(2, 2), 'b': _w(2)}]}, r'.*/b'),
    'nested_mix': ([Pair(w=(_w(1), [_w(2)]), b=_w(3)),
                    Layer(w={'w': _w(2)}, b=[_w(1), _w(2)])],
                   r'0/w/1/0|1/b/.*'),
    'leafless_subtrees': ({'a': {}, 'c': None, 'd': [[], (), None, _w(2)],
                           'b': _w(3)}, r'd/.*'),
    'nnx_state': (_state(), r'kernel/value'),
}


def _assert_exact(back, params):
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert x is y


@pytest.mark.parametrize('name', sorted(CASES))
def test_roundtrip_is_exact(name):
  params, regex = CASES[name]
  train, frozen = lorajax.partition(
      params, LoraSpec([(regex, 'train'), (r'.*', 'freeze')]))
  assert jax.tree.leaves(train) and jax.tree.leaves(frozen)
  _assert_exact(lorajax.combine(train, frozen), params)
  _assert_exact(lorajax.combine(frozen, train), params)
  # The parts hold disjoint leaves that add up to all of them.
  assert (len(jax.tree.leaves(train)) + len(jax.tree.leaves(frozen))
          == len(jax.tree.leaves(params)))


def test_roundtrip_nnx_state_and_merge():
  graphdef, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  train, frozen = lorajax.partition(state, TRAIN_B)
  assert isinstance(train, nnx.State) and isinstance(frozen, nnx.State)
  assert [p for p, _ in lorajax.spec.flatten_paths(train)] == ['bias/value']
  back = lorajax.combine(train, frozen)
  _assert_exact(back, state)
  x = jnp.ones((1, 3))
  np.testing.assert_array_equal(nnx.merge(graphdef, back)(x),
                                nnx.merge(graphdef, state)(x))


def test_list_parts_keep_none_placeholders():
  spec = LoraSpec([(r'1', 'train'), (r'.*', 'freeze')])
  a, b, c = _w(1), _w(2), _w(3)
  train, frozen = lorajax.partition([a, b, c], spec)
  assert train[0] is None and train[1] is b and train[2] is None
  assert frozen[0] is a and frozen[1] is None and frozen[2] is c
  # A container left with nothing becomes None in its parent.
  spec = LoraSpec([(r'b/x/.*', 'train'), (r'.*', 'freeze')])
  train, frozen = lorajax.partition(Pair(w=(a, b), b={'x': [c]}), spec)
  assert train == Pair(w=None, b={'x': [c]})
  assert frozen.w == (a, b) and frozen.b is None


def test_dict_trees_stay_pruned_dicts():
  """The format of checkpoints: plain nested dicts without frozen keys."""
  params = {'enc': {'k': _w(2, 2), 'b': _w(2)}, 'head': {'k': _w(2, 1)}}
  spec = LoraSpec([(r'head/.*', 'train'), (r'.*', 'freeze')])
  train, frozen = lorajax.partition(params, spec)
  assert train == {'head': {'k': params['head']['k']}}
  assert frozen == {'enc': params['enc']}
  assert type(train) is dict and type(train['head']) is dict
  spec = LoraSpec([(r'.*', 'freeze')])
  assert lorajax.partition(params, spec)[0] == {}


def test_empty_part_of_a_tuple_root_is_all_none():
  spec = LoraSpec([(r'.*', 'freeze')])
  params = (_w(1), [_w(2)])
  train, frozen = lorajax.partition(params, spec)
  assert train == (None, None) and jax.tree.leaves(train) == []
  _assert_exact(lorajax.combine(train, frozen), params)


def test_combine_accepts_empty_parts():
  params = [_w(1), Pair(w=_w(2), b=None)]
  _assert_exact(lorajax.combine({}, params, None), params)
  assert lorajax.combine() == {}


def test_labels_and_optimizer_train_only_trainable_leaves():
  params = {'layers': [Pair(w=_w(2, 2), b=_w(2)), Pair(w=_w(2, 2), b=_w(2))],
            'head': Layer(w=_w(2, 3), b=_w(3))}
  labels = lorajax.labels(params, TRAIN_B)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert labels['layers'][1] == Pair(w='frozen', b='trainable')
  tx = lorajax.optimizer(optax.adam(0.1), labels)
  state = tx.init(params)
  train, _ = lorajax.partition(params, TRAIN_B)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_state == 2 * lorajax.count(train) == 2 * (2 + 2 + 3)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for path, leaf in lorajax.spec.flatten_paths(new):
    changed = bool(np.any(np.asarray(leaf) != 1.0))
    assert changed == path.endswith('/b'), path


def test_labels_and_optimizer_on_nnx_state():
  _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  labels = lorajax.labels(state, TRAIN_B)
  tx = lorajax.optimizer(optax.sgd(1.0), labels)
  grads = jax.tree.map(jnp.ones_like, state)
  updates, _ = tx.update(grads, tx.init(state), state)
  assert np.all(np.asarray(updates['bias'][...]) == -1.0)
  assert not np.any(np.asarray(updates['kernel'][...]))


def test_step_on_parts_under_jit_compiles_once():
  params = (Pair(w=_w(2, 2), b=_w(2)), [_w(2, 2)])
  train, frozen = lorajax.partition(params, TRAIN_B)
  traces = []

  @jax.jit
  def step(train, frozen, x):
    traces.append(1)

    def loss(t):
      p = lorajax.combine(t, frozen)
      return jnp.sum((x @ p[0].w + p[0].b) @ p[1][0])

    g = jax.grad(loss)(train)
    return jax.tree.map(lambda a, b: a - 0.1 * b, train, g)

  for _ in range(2):
    train = step(train, frozen, jnp.ones((1, 2)))
  assert len(traces) == 1, 'the step recompiled'
  assert train[1] is None and train[0].w is None
  assert np.all(np.asarray(train[0].b) != 1.0)


def test_trainable_report_counts_list_layers():
  # Issue 12's example: the old report said 8 (the adapters alone).
  params = {'layers': [{'kernel': _w(4, 4), 'bias': _w(5)},
                       {'kernel': _w(4, 4), 'bias': _w(5)}]}
  spec = LoraSpec([(r'.*/kernel', lorajax.Lora(rank=1, alpha=1)),
                   (r'.*/bias', 'train'), (r'.*', 'freeze')])
  adapters = {'layers': {'0': {'kernel': {'a': _w(4, 1), 'b': _w(1, 4)}}}}
  text = lorajax.trainable_report(spec, params, adapters)
  assert text.splitlines()[0] == (
      'trainable params: 18 || all params: 50 || trainable%: 36.0000')
  assert 'layers/1/bias' in text


def test_trainable_report_returns_text_and_does_not_log(caplog):
  params = [{'w': _w(2)}]
  with caplog.at_level(logging.DEBUG):
    text = lorajax.trainable_report(LoraSpec([(r'.*', 'train')]), params, {})
  assert text.startswith('trainable params: 2 || all params: 2 ')
  assert not [r for r in caplog.records if 'trainable' in r.getMessage()]


class _Codes(lorajax.spec.FrozenKernel):
  """A stored kernel that is a pytree node: counted as its kernel shape."""

  def __init__(self, codes):
    self.codes = codes

  def aval(self):
    return jax.ShapeDtypeStruct((4, 4), jnp.float32)


jax.tree_util.register_pytree_node(
    _Codes, lambda c: ((c.codes,), None), lambda _, xs: _Codes(*xs))


def test_frozen_kernel_nodes_are_leaves():
  kernel = _Codes(np.zeros(8, np.int8))
  params = [{'kernel': kernel}, {'bias': _w(4)}]
  spec = LoraSpec([(r'1/.*', 'train'), (r'.*', 'freeze')])
  train, frozen = lorajax.partition(params, spec)
  assert frozen[0]['kernel'] is kernel and frozen[1] is None
  assert lorajax.combine(train, frozen)[0]['kernel'] is kernel
  assert lorajax.count(params) == 16 + 4
  assert lorajax.labels(params, spec)[0] == {'kernel': 'frozen'}


@pytest.mark.parametrize('trees, message', [
    pytest.param(([_w(1), None], [_w(1), None]), "'0' is in more than one",
                 id='overlap'),
    pytest.param(({'a': _w(1)}, {'a': _w(1)}), "'a' is in more than one",
                 id='dict_overlap'),
    pytest.param(({'x': [_w(1), None]}, {'x': (None, _w(1))}),
                 "differ at 'x'.*list.*tuple", id='list_vs_tuple'),
    pytest.param(([_w(1), None], [None, _w(1), None]),
                 'differ at the root', id='other_length'),
    pytest.param(({'x': [None, _w(1)]}, {'x': {'0': _w(1)}}),
                 "differ at 'x'", id='list_vs_dict'),
    pytest.param(({'x': {'y': _w(2)}}, {'x': _w(2)}),
                 r"differ at 'x'.*leaf of shape \(2,\)", id='leaf_vs_dict'),
    pytest.param((Layer(w=_w(1), b=None, name='p'),
                  Layer(w=None, b=_w(1), name='q')),
                 'differ at the root', id='other_static_field'),
])
def test_bad_structure_raises(trees, message):
  with pytest.raises(ValueError, match=message):
    lorajax.combine(*trees)


def test_partition_of_a_leaf_raises():
  with pytest.raises(TypeError, match='single leaf of type ndarray'):
    lorajax.partition(_w(2), LoraSpec([(r'.*', 'freeze')]))


# ---- property: random containers, random rules -----------------------------

_LEAF = st.builds(lambda shape: np.arange(np.prod(shape), dtype=np.float32
                                          ).reshape(shape),
                  st.lists(st.integers(1, 3), max_size=2))
_KEYS = st.sampled_from(['a', 'b', 'kernel', 'x0'])


def _containers(children):
  return st.one_of(
      st.dictionaries(_KEYS, children, max_size=3),
      st.lists(children, max_size=3),
      st.lists(children, max_size=3).map(tuple),
      st.builds(Pair, children, children),
      st.builds(Layer, children, children),
      st.none())


_TREES = _containers(st.recursive(_LEAF, _containers, max_leaves=6)).filter(
    jax.tree.leaves)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(params=_TREES, data=st.data())
def test_random_trees_roundtrip_and_label_counts(params, data):
  paths = [p for p, _ in lorajax.spec.flatten_paths(params)]
  chosen = data.draw(st.sets(st.sampled_from(paths)))
  spec = LoraSpec([(re.escape(p), 'train') for p in sorted(chosen)]
                  + [(r'.*', 'freeze')])
  train, frozen = lorajax.partition(params, spec)
  _assert_exact(lorajax.combine(train, frozen), params)
  labels = jax.tree.leaves(lorajax.labels(params, spec))
  assert labels.count('trainable') == len(chosen)
  sizes = dict(lorajax.spec.flatten_paths(params))
  assert lorajax.count(train) == sum(sizes[p].size for p in chosen)
  assert lorajax.count(train) + lorajax.count(frozen) == lorajax.count(params)
