"""Tests for moe_keras.layers.variable_groups (checkpoint entries of pieces).

Expected arrays are built with numpy from the pieces' own values; the
variables are plain keras.Variables, so no layer code is involved.
"""

import keras
import numpy as np
import pytest

from moe_keras.layers import variable_groups as vg


def _var(value, name):
  return keras.Variable(np.asarray(value, np.float32), name=name)


def _fixture():
  """A variable of its own, 3 stacked parts, 2 uneven blocks, another one."""
  rng = np.random.default_rng(0)
  gate = _var(rng.normal(size=(4, 3)), "gate")
  parts = [_var(rng.normal(size=(4, 5)), f"part{i}") for i in range(3)]
  blocks = [
      _var(rng.normal(size=(2, 5)), "block0"),
      _var(rng.normal(size=(1, 5)), "block1"),
  ]
  bias = _var(rng.normal(size=(7,)), "bias")
  # The owner's order interleaves the groups; each group's entry sits where
  # its first piece is.
  order = [gate, parts[0], blocks[0], parts[1], bias, blocks[1], parts[2]]
  groups = {id(v): (vg.STACK, parts) for v in parts}
  groups.update({id(v): (vg.CONCAT, blocks) for v in blocks})
  entries = vg.entries(order, lambda v: groups.get(id(v)))
  return entries, gate, parts, blocks, bias


def _values(variables):
  return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_entries_order_kinds_and_shapes():
  entries, gate, parts, blocks, bias = _fixture()
  assert [e.how for e in entries] == [vg.ONE, vg.STACK, vg.CONCAT, vg.ONE]
  assert entries[0].variables == [gate]
  assert entries[1].variables == parts
  assert entries[2].variables == blocks
  assert entries[3].variables == [bias]
  assert [vg.entry_shape(e) for e in entries] == [
      (4, 3),
      (3, 4, 5),
      (3, 5),
      (7,),
  ]


def test_an_entry_sits_at_its_first_piece_whatever_comes_first():
  a, b = _var([1.0], "a"), _var([2.0], "b")
  other = _var([3.0], "other")
  group = (vg.STACK, [a, b])
  grouped = {id(a), id(b)}
  entries = vg.entries(
      [b, other, a], lambda v: group if id(v) in grouped else None
  )
  assert [e.how for e in entries] == [vg.ONE, vg.STACK]
  assert entries[0].variables == [other]


def test_save_writes_the_stacked_and_joined_arrays():
  entries, gate, parts, blocks, bias = _fixture()
  store = {}
  vg.save(entries, store)
  assert sorted(store) == ["0", "1", "2", "3"]
  np.testing.assert_array_equal(store["0"], _values([gate])[0])
  np.testing.assert_array_equal(store["1"], np.stack(_values(parts)))
  np.testing.assert_array_equal(store["2"], np.concatenate(_values(blocks)))
  np.testing.assert_array_equal(store["3"], _values([bias])[0])


def test_load_assigns_every_piece():
  entries, gate, parts, blocks, bias = _fixture()
  rng = np.random.default_rng(1)
  store = {
      "0": rng.normal(size=(4, 3)).astype(np.float32),
      "1": rng.normal(size=(3, 4, 5)).astype(np.float32),
      "2": rng.normal(size=(3, 5)).astype(np.float32),
      "3": rng.normal(size=(7,)).astype(np.float32),
  }
  vg.load(entries, store, "owner")
  np.testing.assert_array_equal(_values([gate])[0], store["0"])
  for i, part in enumerate(parts):
    np.testing.assert_array_equal(_values([part])[0], store["1"][i])
  np.testing.assert_array_equal(_values([blocks[0]])[0], store["2"][:2])
  np.testing.assert_array_equal(_values([blocks[1]])[0], store["2"][2:])
  np.testing.assert_array_equal(_values([bias])[0], store["3"])


def test_a_bad_store_is_one_clear_error_and_assigns_nothing():
  entries, gate, parts, blocks, bias = _fixture()
  before = _values([gate, *parts, *blocks, bias])
  store = {}
  vg.save(entries, store)
  store = {key: np.zeros_like(value) for key, value in store.items()}
  store["2"] = np.zeros((4, 5), np.float32)  # one row too many
  with pytest.raises(
      ValueError, match=r"^owner: checkpoint variable 2 has shape \(4, 5\)"
  ):
    vg.load(entries, store, "owner")
  del store["3"]
  assert vg.counts_differ(entries, store)
  with pytest.raises(ValueError, match="^owner: the checkpoint has 3 var"):
    vg.load(entries, store, "owner")
  # Entries 0 and 1 fitted, but nothing was assigned before the error.
  for old, new in zip(before, _values([gate, *parts, *blocks, bias])):
    np.testing.assert_array_equal(old, new)
