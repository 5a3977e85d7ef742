"""ExpertKernelInitializer traced by jax.jit (KERAS_BACKEND=jax subprocess).

Keras initializes a sharded variable inside jax.jit when its size times the
mesh's device count reaches 250 MB (keras.src.backend.jax.core.
should_shard_at_init), e.g. 64 experts of d=256, h=1024 on 4 devices. An
unseeded initializer must work there: values within the variance-scaling
limit, different for each call (expert_kernel_1 and _2 share one
initializer), and the same after the same keras.utils.set_random_seed.
"""

import textwrap

import layer_testlib

SCRIPT = textwrap.dedent("""
    import math
    import jax
    import keras
    import numpy as np
    from moe_keras.layers.sparse_moe import ExpertKernelInitializer

    def draw():
      keras.utils.set_random_seed(0)
      init = ExpertKernelInitializer()
      jitted = jax.jit(init.__call__, static_argnames=["shape", "dtype"])
      return [
          np.asarray(jitted(shape=shape, dtype="float32"))
          for shape in ((4, 8, 16), (4, 16, 8))
      ]

    first, second = draw()
    # fan_avg = (8 + 16) / 2 = 12: limit sqrt(3 / 12) = 0.5.
    limit = math.sqrt(3.0 / 12)
    for value in (first, second):
      assert np.abs(value).max() <= limit, np.abs(value).max()
      assert np.abs(value).max() > 0.9 * limit, np.abs(value).max()
    assert not np.allclose(first.ravel(), second.ravel())
    again, _ = draw()
    np.testing.assert_array_equal(first, again)
    print("JIT_INIT_OK")
""")


def test_unseeded_expert_initializer_under_jit():
  proc = layer_testlib.run_script(SCRIPT, backend="jax", timeout=120)
  assert "JIT_INIT_OK" in proc.stdout, proc.stderr[-3000:]
