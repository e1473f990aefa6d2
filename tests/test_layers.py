"""layers.py: the CPU conv/pool formulations against flax.linen.Conv / nn.max_pool, outputs
AND gradients within 1e-5, for every conv and pool shape LeNet5 and TutorialCNN use, and the
backend choice. The whole models against flax: test_models.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax.layers import (CONV_IMPLS, POOL_IMPLS, Conv2D, ConvReluPool, _max_of_2x2,
                               conv_and_pool_impl, conv_pool_toeplitz, max_pool_2x2)
from tests.helpers import assert_trees_close_to_scale

TOL = dict(rtol=1e-5, atol=1e-5)

# (name, batch input shape H=W, Cin, Cout, kernel, padding): every conv of the two models.
CONV_SHAPES = [
    ("lenet5.conv1", 28, 1, 6, 5, 2),
    ("lenet5.conv2", 14, 6, 16, 5, 0),
    ("cnn.conv1", 28, 1, 16, 3, 1),
    ("cnn.conv2", 14, 16, 32, 3, 1),
]
# every pool input: (H=W, C)
POOL_SHAPES = [(28, 6), (10, 16), (28, 16), (14, 32)]


def _impl_and_conv_shapes():
    """Every conv formulation with every conv shape, for parametrize. A formulation that no
    backend picks for that layer (`conv_and_pool_impl`: kept for comparisons) is marked
    slow: CI runs it, the fast set keeps the ones that train."""
    picked = {name: {conv_and_pool_impl(backend, (k, k, c_in, c_out))[0]
                     for backend in ("cpu", "gpu")}
              for name, _, c_in, c_out, k, _ in CONV_SHAPES}
    return [pytest.param(impl, *shape, id=f"{shape[0]}-{impl}",
                         marks=() if impl in picked[shape[0]] else pytest.mark.slow)
            for shape in CONV_SHAPES for impl in sorted(CONV_IMPLS)]


def _output_loss_and_grads(apply, cot, argnums=(0, 1)):
    """jit of (params..., x) -> ((sum(apply(...) * cot), apply(...)), grads): the output and
    the gradients of a fixed projection of it from one compiled program, where a jitted
    apply and a jitted gradient would compile twice. The values compared are the same."""
    def loss(*args):
        out = apply(*args)
        return jnp.sum(out * cot), out
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("impl,name,hw,c_in,c_out,k,pad", _impl_and_conv_shapes())
def test_conv_outputs_and_grads_equal_flax_conv(impl, name, hw, c_in, c_out, k, pad):
    x = jax.random.normal(jax.random.key(1), (3, hw, hw, c_in))
    ours = Conv2D(c_out, (k, k), padding=pad, impl=impl)
    reference = nn.Conv(c_out, (k, k), padding=pad)
    params = ours.init(jax.random.key(2), x)
    # Same parameter names, shapes and initializer: the same key gives the same weights.
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           reference.init(jax.random.key(2), x))
    cot = jax.random.normal(jax.random.key(3), jax.eval_shape(reference.apply, params, x).shape)

    (l_ours, y_ours), g_ours = _output_loss_and_grads(ours.apply, cot)(params, x)
    (l_ref, y_ref), g_ref = _output_loss_and_grads(reference.apply, cot)(params, x)
    np.testing.assert_allclose(y_ours, y_ref, **TOL)
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
    assert_trees_close_to_scale(g_ours, g_ref)  # d/dkernel, d/dbias and d/dinput


@pytest.mark.parametrize("impl", sorted(POOL_IMPLS))
@pytest.mark.parametrize("hw,c", POOL_SHAPES)
def test_pool_outputs_and_grads_equal_flax_max_pool(impl, hw, c):
    x = jax.random.normal(jax.random.key(0), (3, hw, hw, c))
    # ReLU'd half: windows of tied zeros, where the gradient must go to the first max only.
    x = x.at[:, : hw // 2].set(jnp.maximum(x[:, : hw // 2], 0.0))
    pool = POOL_IMPLS[impl]
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    cot = jax.random.normal(jax.random.key(1), jax.eval_shape(ref, x).shape)
    (_, y_ours), g_ours = _output_loss_and_grads(pool, cot, argnums=0)(x)
    (_, y_ref), g_ref = _output_loss_and_grads(ref, cot, argnums=0)(x)
    np.testing.assert_array_equal(y_ours, y_ref)
    np.testing.assert_allclose(g_ours, g_ref, **TOL)


def test_parity_layout_pool_equals_flax_max_pool_with_ties():
    """`_max_of_2x2` on conv_pool_toeplitz's layout (rows (h pair, h parity, w parity,
    (w / 2, c))): nn.max_pool's values, and its gradient to the first max of a tied window."""
    b, hw, c = 3, 28, 6
    x = jax.random.normal(jax.random.key(0), (b, hw, hw, c))
    x = x.at[:, : hw // 2].set(jnp.maximum(x[:, : hw // 2], 0.0))  # tied zeros

    def ours(x):
        v = x.reshape(b, hw // 2, 2, hw // 2, 2, c).transpose(0, 1, 2, 4, 3, 5)
        return _max_of_2x2(v.reshape(b, hw // 2, 2, 2, hw // 2 * c)).reshape(b, hw // 2,
                                                                              hw // 2, c)

    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    cot = jax.random.normal(jax.random.key(1), (b, hw // 2, hw // 2, c))
    (_, y_ours), g_ours = _output_loss_and_grads(ours, cot, argnums=0)(x)
    (_, y_ref), g_ref = _output_loss_and_grads(ref, cot, argnums=0)(x)
    np.testing.assert_array_equal(y_ours, y_ref)
    np.testing.assert_array_equal(g_ours, g_ref)  # one select each: no sums to reorder


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("name,hw,c_in,c_out,k,pad",
                         CONV_SHAPES[:2] + [("one-window-wide", 6, 1, 3, 5, 0)],
                         ids=["conv1", "conv2", "one-window-wide"])
def test_conv_pool_toeplitz_any_column_groups(groups, name, hw, c_in, c_out, k, pad):
    """The output columns split into 1 or 3 groups (the models use 2, tested below), also
    where there are fewer pool windows across than groups: the same values and gradients as
    nn.Conv then nn.max_pool."""
    x = jax.random.normal(jax.random.key(1), (3, hw, hw, c_in))
    kernel = 0.2 * jax.random.normal(jax.random.key(2), (k, k, c_in, c_out))

    def ref(kernel, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return nn.max_pool(y, (2, 2), strides=(2, 2))

    ours = lambda kernel, x: conv_pool_toeplitz(x, kernel, pad, groups)  # noqa: E731
    cot = jax.random.normal(jax.random.key(3), jax.eval_shape(ref, kernel, x).shape)
    (_, y_ours), g_ours = _output_loss_and_grads(ours, cot)(kernel, x)
    (_, y_ref), g_ref = _output_loss_and_grads(ref, cot)(kernel, x)
    np.testing.assert_allclose(y_ours, y_ref, **TOL)
    assert_trees_close_to_scale(g_ours, g_ref)


@pytest.mark.parametrize("impl,name,hw,c_in,c_out,k,pad", _impl_and_conv_shapes())
def test_conv_relu_pool_equals_flax(impl, name, hw, c_in, c_out, k, pad):
    """pool(relu(conv + b)) as relu(pool(conv) + b), with each conv formulation (Toeplitz:
    `conv_pool_toeplitz`'s one layout): same values and gradients."""
    x = jax.random.normal(jax.random.key(1), (3, hw, hw, c_in))
    ours = ConvReluPool(c_out, (k, k), padding=pad, impl=impl, pool_impl="select")
    conv = nn.Conv(c_out, (k, k), padding=pad)
    params = ours.init(jax.random.key(2), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a nonzero bias

    def ref_apply(p, x):
        return nn.max_pool(nn.relu(conv.apply(p, x)), (2, 2), strides=(2, 2))

    cot = jax.random.normal(jax.random.key(3), jax.eval_shape(ref_apply, params, x).shape)
    (_, y_ours), g_ours = _output_loss_and_grads(ours.apply, cot)(params, x)
    (_, y_ref), g_ref = _output_loss_and_grads(ref_apply, cot)(params, x)
    np.testing.assert_allclose(y_ours, y_ref, **TOL)
    assert_trees_close_to_scale(g_ours, g_ref)


def test_backend_choice_is_made_in_one_place():
    assert conv_and_pool_impl("cpu") == ("toeplitz", "select")  # LeNet-5's first layer
    assert conv_and_pool_impl("cpu", (5, 5, 6, 16)) == ("toeplitz", "select")
    assert conv_and_pool_impl("cpu", (3, 3, 1, 16)) == ("im2col", "select")  # the tutorial CNN
    assert conv_and_pool_impl("cpu", (3, 3, 16, 32)) == ("im2col", "select")
    assert conv_and_pool_impl("gpu") == ("lax", "lax")
    assert conv_and_pool_impl("tpu") == ("lax", "lax")
    assert conv_and_pool_impl() == conv_and_pool_impl(jax.default_backend())


def test_max_pool_2x2_is_the_select_pool():
    assert POOL_IMPLS["select"] is max_pool_2x2


def test_portable_formulations_trace_xla_conv_and_pool_on_a_cpu():
    from fmnist_jax.layers import conv_and_pool_impl, portable_formulations

    assert conv_and_pool_impl("cpu") != ("lax", "lax")
    with portable_formulations():
        assert conv_and_pool_impl("cpu") == ("lax", "lax")
    assert conv_and_pool_impl("cpu") != ("lax", "lax")
