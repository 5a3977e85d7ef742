"""Grouped matmul for dropless experts on GPUs: Pallas (Triton) kernels.

The dropless dispatch sorts the routed rows by expert, so expert g owns
`group_sizes[g]` consecutive rows, and each expert's FFN is one matmul over
its rows (eq. 1's E_i(x) for the tokens routed to i):

    out[r] = lhs[r] @ rhs[g(r)]                    (`grouped_matmul`)

and its weight gradient

    d_rhs[g] = sum_{r in g} lhs[r]^T d_out[r]      (`_transposed_grouped_matmul`)

`jax.lax.ragged_dot` computes the first, but XLA's GPU lowering of it expands
the groups densely (BUILD.md, issue 15), so its cost grows with the number
of experts. These kernels cost what the rows cost:

  * Forward (and the input gradient, the same kernel on rhs^T): a list of
    work items, one per (row tile, group) pair that overlap, of static
    length `num_row_tiles + num_groups - 1` (consecutive groups share at most
    one boundary tile). Program (w, j) multiplies row tile `tile[w]` by
    `rhs[group[w]]`'s column block j and stores only the rows of that group
    (a masked store). Every row belongs to one group, so no two programs
    write the same element; rows past sum(group_sizes) keep the zeros the
    output starts from (an aliased zero buffer).
  * Weight gradient: program (g, i, j) loops over group g's row tiles and
    accumulates lhs_tile^T d_out_tile for its [block_k, block_n] block of
    d_rhs[g], masking the rows of other groups. Empty groups get zeros.

The kernels run in interpret mode on any backend (`interpret=True`: how the
tests check them on CPU), and the GPU path is chosen by
`backend_ops.grouped_matmul` (`MOE_KERAS_JAX_GROUPED_MATMUL`).
"""

import functools
from typing import Optional, Tuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

# Triton launch parameters of both kernels.
NUM_WARPS = 4
NUM_STAGES = 3
# Rows per tile. Triton's dot needs every block dimension >= 16 and a power
# of two; the column (n) and contraction (k) blocks are the largest such
# divisors of the weights' dimensions up to these caps.
BLOCK_M = 64
MAX_BLOCK_N = 128
MAX_BLOCK_K = 64
MIN_BLOCK = 16
_COMPILER_PARAMS = plgpu.CompilerParams(
    num_warps=NUM_WARPS, num_stages=NUM_STAGES
)


def block_size(dim: int, cap: int) -> Optional[int]:
  """Largest power of two in [MIN_BLOCK, cap] dividing `dim`, else None."""
  block = cap
  while block >= MIN_BLOCK:
    if dim % block == 0:
      return block
    block //= 2
  return None


def supports(lhs_shape: Tuple[int, ...], rhs_shape: Tuple[int, ...]) -> bool:
  """Whether the kernels take these shapes (else use `jax.lax.ragged_dot`).

  Args:
    lhs_shape: (R, K); R may be anything (padded to a tile multiple).
    rhs_shape: (G, K, N); K and N must be multiples of MIN_BLOCK (16).

  Returns:
    True when K and N have a block size.
  """
  if len(lhs_shape) != 2 or len(rhs_shape) != 3:
    return False
  _, k, n = rhs_shape
  return (
      lhs_shape[1] == k
      and block_size(k, MAX_BLOCK_K) is not None
      and block_size(n, MAX_BLOCK_N) is not None
  )


def _dot(a, b):
  """a [m, k] @ b [k, n] accumulated in float32 (inside a kernel).

  `jnp.dot` rather than a Triton-specific helper: Pallas lowers dot_general
  (and the transposes before it) on every backend and in the interpreter.
  """
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _group_bounds(group_sizes):
  """(starts, ends): int32 [G] each, group g owns rows [starts[g], ends[g])."""
  ends = jnp.cumsum(group_sizes)
  return ends - group_sizes, ends


def work_items(group_sizes, num_rows: int, block_m: int):
  """The forward kernel's (row tile, group) pairs.

  Args:
    group_sizes: int32 [G], sum <= num_rows.
    num_rows: R, a multiple of block_m.
    block_m: rows per tile.

  Returns:
    (tile, group, valid): int32 [W] each, W = R / block_m + G - 1. Item w
    multiplies row tile tile[w] by group group[w]'s weights; items past the
    real ones have valid 0 (int32: Triton loads no booleans).
  """
  num_groups = group_sizes.shape[0]
  num_tiles = num_rows // block_m
  num_items = num_tiles + num_groups - 1
  starts, ends = _group_bounds(group_sizes)
  first_tile = starts // block_m
  tiles_per_group = jnp.where(
      group_sizes > 0, (ends + block_m - 1) // block_m - first_tile, 0
  )
  item_offsets = jnp.cumsum(tiles_per_group) - tiles_per_group
  group = jnp.repeat(
      jnp.arange(num_groups, dtype=jnp.int32),
      tiles_per_group,
      total_repeat_length=num_items,
  )
  item = jnp.arange(num_items, dtype=jnp.int32)
  valid = item < jnp.sum(tiles_per_group)
  tile = first_tile[group] + item - item_offsets[group]
  tile = jnp.where(valid, tile, 0).astype(jnp.int32)
  return tile, group, valid.astype(jnp.int32)


def _grouped_matmul_kernel(
    tile_ref,
    group_ref,
    valid_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    rhs_ref,
    _,
    out_ref,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    transpose_rhs: bool,
):
  """Program (w, j): out[tile rows of group, column block j] (forward)."""
  w = pl.program_id(0)
  j = pl.program_id(1)

  @pl.when(valid_ref[w] != 0)
  def _():
    group = group_ref[w]
    row0 = tile_ref[w] * block_m
    rows = row0 + jnp.arange(block_m)
    in_group = (rows >= starts_ref[group]) & (rows < ends_ref[group])
    num_k = lhs_ref.shape[1] // block_k

    def body(i, acc):
      a = lhs_ref[pl.ds(row0, block_m), pl.ds(i * block_k, block_k)]
      if transpose_rhs:  # rhs is [G, N, K]: the input gradient's rhs^T.
        b = rhs_ref[
            group, pl.ds(j * block_n, block_n), pl.ds(i * block_k, block_k)
        ]
        return acc + _dot(a, b.T)
      b = rhs_ref[
          group, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)
      ]
      return acc + _dot(a, b)

    acc = jax.lax.fori_loop(
        0, num_k, body, jnp.zeros((block_m, block_n), jnp.float32)
    )
    mask = jnp.broadcast_to(in_group[:, None], (block_m, block_n))
    plgpu.store(
        out_ref.at[pl.ds(row0, block_m), pl.ds(j * block_n, block_n)],
        acc.astype(out_ref.dtype),
        mask=mask,
    )


def _transposed_grouped_matmul_kernel(
    starts_ref,
    ends_ref,
    lhs_ref,
    d_out_ref,
    out_ref,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
):
  """Program (g, i, j): d_rhs[g][k block i, column block j] (weight grad)."""
  g = pl.program_id(0)
  i = pl.program_id(1)
  j = pl.program_id(2)
  start = starts_ref[g]
  end = ends_ref[g]

  def body(t, acc):
    row0 = t * block_m
    rows = row0 + jnp.arange(block_m)
    in_group = (rows >= start) & (rows < end)
    a = lhs_ref[pl.ds(row0, block_m), pl.ds(i * block_k, block_k)]
    a = jnp.where(in_group[:, None], a, jnp.zeros_like(a))
    b = d_out_ref[pl.ds(row0, block_m), pl.ds(j * block_n, block_n)]
    return acc + _dot(a.T, b)

  acc = jax.lax.fori_loop(
      start // block_m,
      (end + block_m - 1) // block_m,
      body,
      jnp.zeros((block_k, block_n), jnp.float32),
  )
  out_ref[g, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)] = (
      acc.astype(out_ref.dtype)
  )


def _pad_rows(x, block_m: int):
  """x [R, c] with zero rows appended up to a multiple of block_m."""
  extra = -x.shape[0] % block_m
  return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def _forward(lhs, rhs, group_sizes, transpose_rhs, interpret, block_m):
  """lhs [R, K] x rhs [G, K, N] (or [G, N, K] transposed) -> [R, N]."""
  num_rows = lhs.shape[0]
  lhs = _pad_rows(lhs, block_m)
  k = lhs.shape[1]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_k = block_size(k, MAX_BLOCK_K)
  block_n = block_size(n, MAX_BLOCK_N)
  tile, group, valid = work_items(group_sizes, lhs.shape[0], block_m)
  starts, ends = _group_bounds(group_sizes)
  kernel = functools.partial(
      _grouped_matmul_kernel,
      block_m=block_m,
      block_n=block_n,
      block_k=block_k,
      transpose_rhs=transpose_rhs,
  )
  zeros = jnp.zeros((lhs.shape[0], n), lhs.dtype)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(zeros.shape, zeros.dtype),
      grid=(tile.shape[0], n // block_n),
      input_output_aliases={7: 0},
      interpret=interpret,
      compiler_params=_COMPILER_PARAMS,
      name="moe_grouped_matmul",
  )(tile, group, valid, starts, ends, lhs, rhs, zeros)
  return out[:num_rows]


def _weight_gradient(lhs, d_out, group_sizes, num_groups, interpret, block_m):
  """d_rhs [G, K, N] = per group lhs_g^T d_out_g."""
  lhs = _pad_rows(lhs, block_m)
  d_out = _pad_rows(d_out, block_m)
  k, n = lhs.shape[1], d_out.shape[1]
  block_k = block_size(k, MAX_BLOCK_K)
  block_n = block_size(n, MAX_BLOCK_N)
  starts, ends = _group_bounds(group_sizes)
  kernel = functools.partial(
      _transposed_grouped_matmul_kernel,
      block_m=block_m,
      block_n=block_n,
      block_k=block_k,
  )
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), lhs.dtype),
      grid=(num_groups, k // block_k, n // block_n),
      interpret=interpret,
      compiler_params=_COMPILER_PARAMS,
      name="moe_grouped_matmul_weight_grad",
  )(starts, ends, lhs, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs, rhs, group_sizes, interpret, block_m):
  return _forward(lhs, rhs, group_sizes, False, interpret, block_m)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, interpret, block_m):
  out = _forward(lhs, rhs, group_sizes, False, interpret, block_m)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(interpret, block_m, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_out = d_out.astype(lhs.dtype)
  d_lhs = _forward(d_out, rhs, group_sizes, True, interpret, block_m)
  d_rhs = _weight_gradient(
      lhs, d_out, group_sizes, rhs.shape[0], interpret, block_m
  )
  return d_lhs, d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    lhs, rhs, group_sizes, *, interpret: bool = False, block_m: int = BLOCK_M
):
  """out[r] = lhs[r] @ rhs[g(r)] over rows sorted by group (eq. 1's experts).

  Same values and gradients as `jax.lax.ragged_dot(lhs, rhs, group_sizes)`
  (tested), at a cost proportional to the rows, not to rows x groups.

  Args:
    lhs: [R, K] rows sorted by group; rows past sum(group_sizes) are ignored.
    rhs: [G, K, N]; K and N multiples of 16 (`supports`).
    group_sizes: int [G], sum <= R.
    interpret: run the kernels in Pallas's interpreter (any backend).
    block_m: rows per tile (a power of two >= 16).

  Returns:
    [R, N] in lhs's dtype (accumulated in float32); zero rows past
    sum(group_sizes).

  Raises:
    ValueError: shapes the kernels do not take, or a bad block_m.
  """
  if not supports(tuple(lhs.shape), tuple(rhs.shape)):
    raise ValueError(
        "pallas grouped_matmul needs lhs [R, K] and rhs [G, K, N] with K and"
        f" N multiples of {MIN_BLOCK}, got {tuple(lhs.shape)} and"
        f" {tuple(rhs.shape)}"
    )
  if block_m < MIN_BLOCK or block_m & (block_m - 1):
    raise ValueError(
        f"block_m must be a power of two >= {MIN_BLOCK}, got {block_m}"
    )
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(
        f"group_sizes must have shape ({rhs.shape[0]},), got"
        f" {tuple(group_sizes.shape)}"
    )
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  if lhs.shape[0] == 0:  # No rows: no grid to launch (gradients are zeros).
    return jnp.zeros((0, rhs.shape[2]), dtype)
  return _grouped_matmul(
      lhs.astype(dtype),
      rhs.astype(dtype),
      group_sizes.astype(jnp.int32),
      interpret,
      block_m,
  )
