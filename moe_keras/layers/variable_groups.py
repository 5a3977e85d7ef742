"""Checkpoint entries of variables kept in pieces: one array per group.

An expert weight can live in pieces: one variable per expert
(`SparseMoE(expert_variables="per_expert")`) or one block of experts per
device (`moe_keras.distribution.sharded_experts`), and an optimizer keeps
one slot per piece. Checkpoints hold every such group as the single
[n, ...] array a stacked single-device layer (or its optimizer) would hold,
at the index of the group's first piece, so that a checkpoint restores into
any layout. This module turns a list of variables into those entries and
saves and loads them; the owners say which variables form a group.
"""

import collections

import numpy as np
from keras import ops

ONE = "one"  # a variable of its own
STACK = "stack"  # pieces [...] stacked along a new axis 0 (one per expert)
CONCAT = "concat"  # pieces [m, ...] concatenated along axis 0 (expert blocks)

# how: ONE, STACK or CONCAT; variables: the pieces in order (one for ONE).
Entry = collections.namedtuple("Entry", ["how", "variables"])


def entries(variables, group_of):
  """The checkpoint entries of `variables`, in their order.

  Args:
    variables: the owner's variables in the order a stacked unsharded
      owner's would be saved.
    group_of: callable(variable) -> None (a variable of its own) or
      (how, pieces): how is STACK or CONCAT and pieces the whole group in
      order, which includes the variable.

  Returns:
    list of Entry: one per variable of its own, and one per group at the
    place of the group's first piece (its other pieces take no index).
  """
  result = []
  for variable in variables:
    group = group_of(variable)
    if group is None:
      result.append(Entry(ONE, [variable]))
    elif group[1][0] is variable:
      result.append(Entry(group[0], list(group[1])))
  return result


def entry_shape(entry):
  """Shape of the one array that stands for `entry` (a tuple of ints)."""
  first = tuple(entry.variables[0].shape)
  if entry.how == STACK:
    return (len(entry.variables),) + first
  if entry.how == CONCAT:
    rows = sum(int(v.shape[0]) for v in entry.variables)
    return (rows,) + first[1:]
  return first


def entry_value(entry):
  """numpy array of `entry`: the variable, or its pieces stacked/joined."""
  values = [ops.convert_to_numpy(v) for v in entry.variables]
  if entry.how == STACK:
    return np.stack(values, axis=0)
  if entry.how == CONCAT:
    return np.concatenate(values, axis=0)
  return values[0]


def assign_entry(entry, value):
  """Assigns the array `value` (of `entry_shape`) to the entry's pieces."""
  if entry.how == STACK:
    pieces = list(value)
  elif entry.how == CONCAT:
    splits = np.cumsum([int(v.shape[0]) for v in entry.variables])[:-1]
    pieces = np.split(value, splits, axis=0)
  else:
    pieces = [value]
  for variable, piece in zip(entry.variables, pieces):
    variable.assign(piece)


def save(entries_list, store):
  """Writes entry i's array as store[str(i)] (a Keras weights store)."""
  for i, entry in enumerate(entries_list):
    store[str(i)] = entry_value(entry)


def counts_differ(entries_list, store):
  """Whether the store holds another number of variables than the entries."""
  return len(store.keys()) != len(entries_list)


def load(entries_list, store, owner):
  """Assigns what `save` (or the stacked unsharded owner) wrote.

  Checks every shape before assigning anything, so a store of another
  model leaves the variables as they were.

  Args:
    entries_list: from `entries`.
    store: a Keras weights store.
    owner: name for error messages.

  Raises:
    ValueError: the store has another number of variables, or one of
      another shape.
  """
  if counts_differ(entries_list, store):
    raise ValueError(
        f"{owner}: the checkpoint has {len(store.keys())} variables for it,"
        f" expected {len(entries_list)}"
    )
  values = []
  for i, entry in enumerate(entries_list):
    value = np.asarray(store[str(i)])
    if value.shape != entry_shape(entry):
      raise ValueError(
          f"{owner}: checkpoint variable {i} has shape {value.shape},"
          f" expected {entry_shape(entry)}"
      )
    values.append(value)
  for entry, value in zip(entries_list, values):
    assign_entry(entry, value)
