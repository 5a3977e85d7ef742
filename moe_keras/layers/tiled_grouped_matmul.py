"""Grouped matmul for dropless experts on CPUs (JAX): a loop over the groups.

The dropless dispatch sorts the routed rows by expert, so expert g owns
`group_sizes[g]` consecutive rows, and each expert's FFN is one matmul over
its rows (eq. 1's E_i(x) for the tokens routed to i):

    out[r] = lhs[r] @ rhs[g(r)]                    (`grouped_matmul`)

with the gradients

    d_lhs[r] = d_out[r] @ rhs[g(r)]^T              (the same loop on rhs^T)
    d_rhs[g] = sum_{r in g} lhs[r]^T d_out[r]      (`_weight_gradient`)

XLA:CPU lowers `jax.lax.ragged_dot` densely (every row against every group's
weights, masked), so its time and memory grow with rows x groups: 20-130x
capacity mode's step at 16-64 experts (BUILD.md, issue 15). Here the cost is
that of the rows, as with TensorFlow's one MatMul per expert, with static
shapes so that the layer jit-compiles:

  * a `lax.scan` over the groups; group g's weights are sliced once;
  * inside, g's rows in tiles that start at its first row: full tiles of
    `block_m` rows (a loop of size // block_m trips), then the remainder as
    at most one tile of each power of two below block_m down to MIN_TILE
    (its bits), then one tile of MIN_TILE rows for what is left (fewer than
    MIN_TILE rows). Every tile but that last one lies inside the group, so
    it is written unmasked (`dynamic_update_slice`, in place in the loop);
    the last one is masked and keeps the next group's rows. So at most
    MIN_TILE - 1 rows per group are computed for nothing;
  * the weight gradient of group g accumulates lhs_tile^T d_out_tile over
    the same tiles (the masked tile's foreign rows zeroed) in float32 and
    is the scan's g-th output: [G, K, N] is written once, with no copy.

Rows past sum(group_sizes) are neither read nor written: they stay zero in
the output and in d_lhs. `backend_ops.grouped_matmul` chooses this on CPUs
(`MOE_KERAS_JAX_GROUPED_MATMUL`).
"""

import functools

import jax
import jax.numpy as jnp

# Rows per full tile (measured on a 2-core CPU, 16384 rows, K=512, N=1024:
# 128 and 256 within 10% of each other at 64 and 512 groups; BUILD.md).
BLOCK_M = 128
# The smallest tile: the remainder below it is one masked tile.
MIN_TILE = 8


def _dot(a, b):
  """a [m, k] @ b [k, n], accumulated in float32."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _remainder_tiles(block_m):
  """The static tile sizes of a group's remainder: block_m/2, ..., MIN_TILE."""
  sizes = []
  size = block_m // 2
  while size >= MIN_TILE:
    sizes.append(size)
    size //= 2
  return sizes


def _over_tiles(carry, start, size, visit, block_m):
  """Runs `visit` over the tiles of one group's rows [start, start + size).

  Args:
    carry: the loop state.
    start: int32 scalar, the group's first row.
    size: int32 scalar, its number of rows.
    visit: (carry, row0, rows, valid) -> carry, for the tile of `rows`
      (static) rows from row0 (int32 scalar); valid is None for a tile
      inside the group, else the int32 number of its first rows that are.
    block_m: rows of a full tile.

  Returns:
    The carry after every tile.
  """
  full = size // block_m
  carry = jax.lax.fori_loop(
      0,
      full,
      lambda t, c: visit(c, start + t * block_m, block_m, None),
      carry,
  )
  row0 = start + full * block_m
  rest = size - full * block_m
  for rows in _remainder_tiles(block_m):
    take = (rest & rows) != 0
    carry = jax.lax.cond(
        take,
        lambda c, r0=row0, n=rows: visit(c, r0, n, None),
        lambda c: c,
        carry,
    )
    row0 = row0 + jnp.where(take, rows, 0)
  last = rest % MIN_TILE
  return jax.lax.cond(
      last > 0,
      lambda c: visit(c, row0, MIN_TILE, last),
      lambda c: c,
      carry,
  )


def _group_starts(group_sizes):
  return jnp.cumsum(group_sizes) - group_sizes


def _pad(rows, block_m):
  """rows [R, c] with block_m zero rows appended: every tile's slice is in
  range (only a group's last, masked tile reaches past R)."""
  return jnp.pad(rows, ((0, block_m), (0, 0)))


def _forward(lhs, rhs, group_sizes, num_rows, transpose_rhs, block_m):
  """lhs [R + block_m, K] (`_pad`) x rhs [G, K, N] (or [G, N, K]
  transposed) -> [R, N]."""
  k = lhs.shape[1]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  starts = _group_starts(group_sizes)

  def group(out, g):
    weights = rhs[g].T if transpose_rhs else rhs[g]

    def visit(out, row0, rows, valid):
      tile = jax.lax.dynamic_slice(lhs, (row0, 0), (rows, k))
      result = _dot(tile, weights).astype(out.dtype)
      if valid is not None:
        kept = jax.lax.dynamic_slice(out, (row0, 0), (rows, n))
        result = jnp.where((jnp.arange(rows) < valid)[:, None], result, kept)
      return jax.lax.dynamic_update_slice(out, result, (row0, 0))

    return _over_tiles(out, starts[g], group_sizes[g], visit, block_m), None

  out = jnp.zeros((num_rows + block_m, n), lhs.dtype)
  out, _ = jax.lax.scan(group, out, jnp.arange(rhs.shape[0]))
  return out[:num_rows]


def _weight_gradient(lhs, d_out, group_sizes, num_groups, block_m):
  """d_rhs [G, K, N] = per group lhs_g^T d_out_g, from padded lhs and d_out
  ([R + block_m, .], `_pad`)."""
  k, n = lhs.shape[1], d_out.shape[1]
  starts = _group_starts(group_sizes)

  def group(_, g):
    def visit(acc, row0, rows, valid):
      tile = jax.lax.dynamic_slice(lhs, (row0, 0), (rows, k))
      if valid is not None:
        tile = jnp.where((jnp.arange(rows) < valid)[:, None], tile, 0)
      d_tile = jax.lax.dynamic_slice(d_out, (row0, 0), (rows, n))
      return acc + _dot(tile.T, d_tile)

    acc = jnp.zeros((k, n), jnp.float32)
    acc = _over_tiles(acc, starts[g], group_sizes[g], visit, block_m)
    return None, acc.astype(lhs.dtype)

  _, d_rhs = jax.lax.scan(group, None, jnp.arange(num_groups))
  return d_rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, block_m):
  return _grouped_matmul_fwd(lhs, rhs, group_sizes, block_m)[0]


def _grouped_matmul_fwd(lhs, rhs, group_sizes, block_m):
  # Padded once: the forward and the weight gradient read the same copy.
  padded = _pad(lhs, block_m)
  out = _forward(padded, rhs, group_sizes, lhs.shape[0], False, block_m)
  return out, (padded, rhs, group_sizes)


def _grouped_matmul_bwd(block_m, residuals, d_out):
  padded, rhs, group_sizes = residuals
  num_rows = d_out.shape[0]
  # Padded once: the input and the weight gradient read the same copy.
  d_padded = _pad(d_out.astype(padded.dtype), block_m)
  d_lhs = _forward(d_padded, rhs, group_sizes, num_rows, True, block_m)
  d_rhs = _weight_gradient(padded, d_padded, group_sizes, rhs.shape[0], block_m)
  return d_lhs, d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, block_m: int = BLOCK_M):
  """out[r] = lhs[r] @ rhs[g(r)] over rows sorted by group (eq. 1's experts).

  Same values and gradients as `jax.lax.ragged_dot(lhs, rhs, group_sizes)`
  (tested), at a cost proportional to the rows, not to rows x groups.

  Args:
    lhs: [R, K] rows sorted by group; rows past sum(group_sizes) are ignored.
    rhs: [G, K, N].
    group_sizes: int [G], sum <= R.
    block_m: rows per full tile (a power of two >= MIN_TILE).

  Returns:
    [R, N] in the common dtype of lhs and rhs (accumulated in float32);
    zero rows past sum(group_sizes).

  Raises:
    ValueError: lhs, rhs or group_sizes of the wrong rank or shape, or a bad
      block_m.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(
        "grouped_matmul needs lhs [R, K] and rhs [G, K, N], got"
        f" {tuple(lhs.shape)} and {tuple(rhs.shape)}"
    )
  if block_m < MIN_TILE or block_m & (block_m - 1):
    raise ValueError(
        f"block_m must be a power of two >= {MIN_TILE}, got {block_m}"
    )
  if tuple(group_sizes.shape) != (rhs.shape[0],):
    raise ValueError(
        f"group_sizes must have shape ({rhs.shape[0]},), got"
        f" {tuple(group_sizes.shape)}"
    )
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  return _grouped_matmul(
      lhs.astype(dtype),
      rhs.astype(dtype),
      group_sizes.astype(jnp.int32),
      block_m,
  )
