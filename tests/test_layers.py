"""layers.py: the CPU conv/pool formulations against flax.linen.Conv / nn.max_pool, outputs
AND gradients within 1e-5, for every conv and pool shape LeNet5 and TutorialCNN use, and the
backend choice; the drop-ins `Conv` and `max_pool` against nn.Conv and nn.max_pool over a grid
of shapes, strides and paddings. The whole models against flax: test_models.py."""

import itertools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax.errors import FmnistError
from fmnist_jax.conv_forms import CONV_IMPLS, POOL_IMPLS, _max_of_2x2, conv_pool_toeplitz
from fmnist_jax.layers import (Conv, ConvReluPool, conv_and_pool_impl, max_pool,
                               portable_formulations)
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


def _impl_and_conv_shapes(fast):
    """Every conv formulation with every conv shape, for parametrize. The fast set keeps, for
    the layers named in `fast`, the form a CPU trains that layer with (`conv_and_pool_impl`:
    a matrix form); the rest is marked slow, CI runs it. "lax", the GPU's choice, is XLA's
    convolution, nn.Conv's own; a form no backend picks for a layer is kept for comparisons;
    every layer in its CPU form is in test_models' whole models, gradients included."""
    picked = {name: conv_and_pool_impl("cpu", (k, k, c_in, c_out))[0]
              for name, _, c_in, c_out, k, _ in CONV_SHAPES}
    return [pytest.param(impl, *shape, id=f"{shape[0]}-{impl}",
                         marks=() if shape[0] in fast and impl == picked[shape[0]]
                         else pytest.mark.slow)
            for shape in CONV_SHAPES for impl in sorted(CONV_IMPLS)]


def _output_loss_and_grads(apply, cot, argnums=(0, 1)):
    """jit of (params..., x) -> ((sum(apply(...) * cot), apply(...)), grads): the output and
    the gradients of a fixed projection of it from one compiled program, where a jitted
    apply and a jitted gradient would compile twice. The values compared are the same."""
    def loss(*args):
        out = apply(*args)
        return jnp.sum(out * cot), out
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("impl,name,hw,c_in,c_out,k,pad",
                         _impl_and_conv_shapes(fast={"cnn.conv2"}))
def test_conv_outputs_and_grads_equal_flax_conv(impl, name, hw, c_in, c_out, k, pad):
    x = jax.random.normal(jax.random.key(1), (3, hw, hw, c_in))
    ours = Conv(c_out, (k, k), padding=pad, impl=impl)
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


# The fast set: the select pool (a CPU's) on LeNet-5's first pool and the CNN's second; "lax"
# (the GPU's choice) is nn.max_pool itself. The rest is slow, CI runs it.
@pytest.mark.parametrize("impl,hw,c", [
    pytest.param(impl, hw, c, id=f"{hw}-{c}-{impl}",
                 marks=() if impl == "select" and (hw, c) in {(28, 6), (14, 32)}
                 else pytest.mark.slow)
    for hw, c in POOL_SHAPES for impl in sorted(POOL_IMPLS)])
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


# The fast set: 3 groups of LeNet-5's conv2 and of one window across; the rest is slow.
@pytest.mark.parametrize("groups,name,hw,c_in,c_out,k,pad", [
    pytest.param(groups, *shape, id=f"{id_}-{groups}",
                 marks=() if (groups, id_) in {(3, "conv2"), (3, "one-window-wide")}
                 else pytest.mark.slow)
    for shape, id_ in zip(CONV_SHAPES[:2] + [("one-window-wide", 6, 1, 3, 5, 0)],
                          ["conv1", "conv2", "one-window-wide"])
    for groups in (1, 3)])
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


@pytest.mark.parametrize("impl,name,hw,c_in,c_out,k,pad",
                         _impl_and_conv_shapes(fast={"cnn.conv1"}))
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
    assert conv_and_pool_impl("cpu", (5, 5, 6, 16), padded_width=14) == ("toeplitz", "select")
    assert conv_and_pool_impl("cpu", (3, 3, 1, 16), padded_width=30) == ("im2col", "select")
    assert conv_and_pool_impl("cpu", (3, 3, 16, 32), padded_width=16) == ("shifted", "select")
    # the user model of benchmarks.user_model; a 7x7 first layer of 16 filters
    assert conv_and_pool_impl("cpu", (5, 5, 1, 32), padded_width=32)[0] == "im2col"
    assert conv_and_pool_impl("cpu", (5, 5, 32, 64), padded_width=18)[0] == "shifted"
    assert conv_and_pool_impl("cpu", (5, 5, 32, 64), (1, 2), padded_width=18)[0] == "im2col"
    assert conv_and_pool_impl("cpu", (1, 1, 32, 64), padded_width=14)[0] == "im2col"
    assert conv_and_pool_impl("cpu", (3, 3, 4, 32), padded_width=30)[0] == "shifted"
    assert conv_and_pool_impl("cpu", (5, 5, 2, 32), padded_width=32)[0] == "im2col"
    assert conv_and_pool_impl("cpu", (7, 7, 1, 16), padded_width=34)[0] == "toeplitz"
    assert conv_and_pool_impl("cpu", (7, 7, 16, 32), padded_width=20)[0] == "toeplitz"
    assert conv_and_pool_impl("cpu", (3, 3, 8, 16), (2, 2), padded_width=29)[0] == "im2col"
    assert conv_and_pool_impl("gpu") == ("lax", "lax")
    assert conv_and_pool_impl("tpu") == ("lax", "lax")
    assert conv_and_pool_impl() == conv_and_pool_impl(jax.default_backend())


def test_the_select_pool_is_the_custom_gradient_one():
    jaxpr = str(jax.make_jaxpr(POOL_IMPLS["select"])(jnp.zeros((1, 5, 4, 2))))
    assert "custom_vjp_call" in jaxpr and "reduce_window" not in jaxpr


def test_portable_formulations_trace_xla_conv_and_pool_on_a_cpu():
    from fmnist_jax.layers import conv_and_pool_impl, portable_formulations

    assert conv_and_pool_impl("cpu") != ("lax", "lax")
    with portable_formulations():
        assert conv_and_pool_impl("cpu") == ("lax", "lax")
    assert conv_and_pool_impl("cpu") != ("lax", "lax")


# ------------------------------------------------- layers.Conv and layers.max_pool, drop-ins
# for nn.Conv and nn.max_pool: the same parameters, outputs and gradients (input, kernel,
# bias) over a grid of shapes, paddings and strides; params moving between an nn.Conv model
# and a Conv model; nn.Conv's own computation for what the matrix forms do not cover.


def _conv_values_and_grads(modules, params, x):
    """Each module's output, and the gradients of a fixed random projection of it w.r.t.
    params and x: one jitted program for all the modules (one compile)."""
    cot = jax.random.normal(jax.random.key(7), jax.eval_shape(modules[0].apply, params, x).shape)

    def all_of_them(params, x):
        return [jax.value_and_grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * cot),
                                   argnums=(0, 1))(params, x) + (m.apply(params, x),)
                for m in modules]
    return jax.jit(all_of_them)(params, x)


def _check_conv(hw, c_in, c_out, k, stride, padding):
    """Conv with each matrix form against nn.Conv: outputs and d/dkernel, d/dbias, d/dinput."""
    x = jax.random.normal(jax.random.key(1), (2, hw, hw + 2, c_in))  # H != W, both odd
    ref = nn.Conv(c_out, (k, k), strides=stride, padding=padding)
    ours = [Conv(c_out, (k, k), strides=stride, padding=padding, impl=impl)
            for impl in sorted(CONV_IMPLS) if impl != "lax"]
    params = ref.init(jax.random.key(2), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           ours[0].init(jax.random.key(2), x))  # same names, shapes, init
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a nonzero bias
    (_, g_ref, y_ref), *results = _conv_values_and_grads([ref, *ours], params, x)
    for _, g_ours, y_ours in results:
        assert y_ours.shape == y_ref.shape
        np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
        assert_trees_close_to_scale(g_ours, g_ref)


# (H, Cin, Cout, kernel, stride, padding): every padding kind and stride, kernels 1-7,
# channels 1-64, odd sizes; the fast set runs the first two, the rest and the full grid
# below are slow.
CASES = [(9, 1, 6, 5, 1, "SAME"), (7, 3, 8, 3, 2, ((1, 2), 0)),
         (7, 32, 64, 1, 2, "VALID"), (9, 2, 3, 7, 1, 3)]


@pytest.mark.parametrize("case", [pytest.param(case, id=str(case),
                                               marks=() if i < 2 else pytest.mark.slow)
                                  for i, case in enumerate(CASES)])
def test_conv_equals_nn_conv(case):
    _check_conv(*case)


def _full_grid():
    channels = itertools.cycle([(1, 6), (3, 16), (16, 32), (32, 64), (5, 1)])
    sizes = itertools.cycle([7, 9, 13])
    return [pytest.param(next(sizes), *next(channels), k, stride, padding,
                         id=f"k{k}-s{stride}-{padding}")
            for k in range(1, 8) for stride in (1, 2)
            for padding in ("SAME", "VALID", 2, ((0, 3), (2, 1)))]


@pytest.mark.slow
@pytest.mark.parametrize("hw,c_in,c_out,k,stride,padding", _full_grid())
def test_conv_equals_nn_conv_full_grid(hw, c_in, c_out, k, stride, padding):
    _check_conv(hw, c_in, c_out, k, stride, padding)


def _traces(module, x):
    jaxpr = str(jax.make_jaxpr(module.init)(jax.random.key(0), x))
    return "conv_general_dilated" in jaxpr


def test_conv_takes_the_matrix_forms_on_a_cpu_and_xla_for_exports():
    x = jnp.zeros((2, 9, 9, 3))
    conv = Conv(4, (3, 3), strides=2)
    assert _traces(conv, x) == (jax.default_backend() != "cpu")
    with portable_formulations():
        assert _traces(conv, x)


FALLBACKS = [  # (what the matrix forms lack, Conv's arguments, input shape)
    ("stride 3", dict(features=4, kernel_size=(3, 3), strides=3), (2, 10, 10, 3)),
    ("dilation", dict(features=4, kernel_size=(3, 3), kernel_dilation=2), (2, 9, 9, 3)),
    ("groups", dict(features=4, kernel_size=(3, 3), feature_group_count=2), (2, 9, 9, 4)),
    ("circular", dict(features=4, kernel_size=(3, 3), padding="CIRCULAR"), (2, 9, 9, 3)),
    ("1-D", dict(features=4, kernel_size=(3,)), (2, 9, 3)),
    ("3-D", dict(features=4, kernel_size=(2, 2, 2)), (2, 5, 5, 5, 3)),
]


@pytest.mark.parametrize("why,kwargs,shape", [  # two in the fast set, the rest slow
    pytest.param(*case, id=case[0], marks=() if case[0] in ("stride 3", "1-D")
                 else pytest.mark.slow) for case in FALLBACKS])
def test_what_the_matrix_forms_do_not_cover_is_nn_conv(why, kwargs, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    ours, ref = Conv(**kwargs), nn.Conv(**kwargs)
    assert _traces(ours, x)
    params = ref.init(jax.random.key(2), x)
    y_ours, y_ref = jax.jit(lambda p, x: (ours.apply(p, x), ref.apply(p, x)))(params, x)
    np.testing.assert_array_equal(y_ours, y_ref)


def test_conv_keeps_nn_conv_dtypes_and_options():
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    kwargs = dict(features=5, kernel_size=(3, 3), use_bias=False, dtype=jnp.bfloat16,
                  kernel_init=nn.initializers.ones_init(), precision=jax.lax.Precision.HIGHEST)
    ours, ref = Conv(**kwargs), nn.Conv(**kwargs)
    params = ref.init(jax.random.key(2), x)
    assert set(params["params"]) == {"kernel"}
    y_ours, y_ref = ours.apply(params, x), ref.apply(params, x)
    assert y_ours.dtype == y_ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y_ours), np.float32(y_ref), rtol=2e-2, atol=5e-2)


def test_an_unknown_impl_is_a_user_error():
    with pytest.raises(FmnistError, match="unknown conv impl 'fast'.*choose one of"):
        Conv(4, (3, 3), impl="fast").init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))


class _UserModel(nn.Module):
    """A user's model, written once with its conv and pool as fields."""

    conv: object = nn.Conv
    pool: object = nn.max_pool

    @nn.compact
    def __call__(self, x):
        x = self.pool(nn.relu(self.conv(8, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
        x = self.pool(nn.relu(self.conv(16, (3, 3), strides=2, padding=1)(x)), (2, 2),
                      strides=(2, 2), padding="SAME")
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_params_move_between_nn_conv_and_conv_models_both_ways():
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    flax_model, our_model = _UserModel(), _UserModel(Conv, max_pool)
    flax_params = jax.jit(flax_model.init)(jax.random.key(2), x)
    our_params = jax.jit(our_model.init)(jax.random.key(3), x)
    assert (jax.tree_util.tree_structure(flax_params)
            == jax.tree_util.tree_structure(our_params))  # Conv_0/kernel, ... on both sides
    both = jax.jit(lambda p, x: (our_model.apply(p, x), flax_model.apply(p, x)))
    for params in (flax_params, our_params):
        np.testing.assert_allclose(*both(params, x), rtol=1e-5, atol=1e-5)


POOLS = [  # (input shape, window, strides, padding)
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (2, 2), (2, 2), "SAME"),
    ((2, 6, 8, 3), (2, 2), (2, 2), ((1, 2), (3, 0))),
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),  # nn.max_pool's own: a 3x3 window
    ((2, 8, 8, 3), (2, 2), None, "VALID"),  # stride 1, nn.max_pool's default
    ((9, 8, 3), (2, 2), (2, 2), "VALID"),  # no batch axis
]


def test_max_pool_equals_nn_max_pool_with_ties():
    """Every case of POOLS, in one jitted program: the same values, and the same gradient
    (to the first maximum of a tied window) exactly."""
    rng = np.random.default_rng(0)  # numpy: no small programs to compile eagerly
    xs, cots = [], []
    for shape, window, strides, padding in POOLS:
        x = rng.normal(size=shape).astype(np.float32)
        x[..., : shape[-2] // 2, :] = np.maximum(x[..., : shape[-2] // 2, :], 0.0)
        x[..., 0] = np.round(x[..., 0])  # tied zeros and more ties
        xs.append(x)
        out = jax.eval_shape(lambda x: nn.max_pool(x, window, strides, padding), x)
        cots.append(rng.normal(size=out.shape).astype(np.float32))

    def all_pools(xs):
        results = []
        for x, cot, (_, window, strides, padding) in zip(xs, cots, POOLS):
            for pool in (max_pool, nn.max_pool):
                y, vjp = jax.vjp(lambda x, pool=pool: pool(x, window, strides, padding), x)
                results.append((y, vjp(cot)[0]))
        return results
    results = jax.jit(all_pools)(xs)
    for (y_ours, g_ours), (y_ref, g_ref) in zip(results[::2], results[1::2]):
        np.testing.assert_array_equal(y_ours, y_ref)
        np.testing.assert_array_equal(g_ours, g_ref)


def test_max_pool_takes_the_select_pool_on_a_cpu_only_where_it_covers():
    x = jnp.zeros((2, 9, 7, 3))
    traced = lambda *args: str(jax.make_jaxpr(lambda x: max_pool(x, *args))(x))  # noqa: E731
    assert ("reduce_window" in traced((2, 2), (2, 2), "SAME")) == (jax.default_backend() != "cpu")
    assert "reduce_window" in traced((3, 3), (2, 2))
    with portable_formulations():
        assert "reduce_window" in traced((2, 2), (2, 2))


@pytest.mark.slow
def test_conv_relu_pool_with_odd_outputs_and_strides():
    """ConvReluPool where the conv output has an odd side (its last row is in no window):
    the fused Toeplitz layout, the shifted form, and im2col at stride 2, against nn.Conv,
    relu, nn.max_pool."""
    x = jax.random.normal(jax.random.key(1), (2, 11, 13, 3))
    for impl, stride in [("toeplitz", 1), ("shifted", 1), ("im2col", 2)]:
        ours = ConvReluPool(6, (4, 4), strides=stride, padding="SAME", impl=impl,
                            pool_impl="select")
        conv = nn.Conv(6, (4, 4), strides=stride, padding="SAME")
        params = jax.tree_util.tree_map(lambda p: p + 0.1, conv.init(jax.random.key(2), x))
        ref = types.SimpleNamespace(apply=lambda p, x, conv=conv: nn.max_pool(
            nn.relu(conv.apply(p, x)), (2, 2), strides=(2, 2)))
        (_, g_ref, y_ref), (_, g_ours, y_ours) = _conv_values_and_grads([ref, ours], params, x)
        np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
        assert_trees_close_to_scale(g_ours, g_ref)
