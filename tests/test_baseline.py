"""The PyTorch baseline: the same models (LeNet-5 and the tutorial CNN), exact weight exchange,
the JAX batch order, and torch and JAX taking the same Adam steps from the same init on the
same batches.

All on CPU and small random data: the equalities are what make a head-to-head comparison
"same model, same init, same batches, different framework".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from fmnist_jax.baseline import TORCH_MODELS, exchange, order  # noqa: E402
from fmnist_jax.baseline import torch_models as tm  # noqa: E402
from fmnist_jax.baseline import torch_train as tt  # noqa: E402
from fmnist_jax.errors import FmnistError  # noqa: E402
from fmnist_jax.models import MODELS, LeNet5, count_params, get_model  # noqa: E402
from fmnist_jax.data import HALF  # noqa: E402
from fmnist_jax.steps import create_train_state, evaluate, normalize, train_epoch  # noqa: E402

NORM = HALF
# Each torch model with its Flax model's parameter count (the LeNet-5 report's 61,706 and the
# tutorial CNN's 206,922).
PARAM_COUNTS = {"lenet5": 61_706, "cnn": 206_922}


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images_NxHxWx1 = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels_N = rng.integers(0, 10, n).astype(np.int32)
    return images_NxHxWx1, labels_N


def abstract_params(model: str):
    """`model`'s Flax params as shapes only (no init computation)."""
    return jax.eval_shape(get_model(model).init, jax.random.key(0),
                          jnp.zeros((1, 28, 28, 1)))["params"]


def random_flax_params(seed: int = 0, model: str = "lenet5") -> dict:
    """`model`'s params with every leaf random, biases too (their init is zeros, which would
    hide a misplaced bias)."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract_params(model))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@functools.partial(jax.jit, static_argnames="model")
def _flax_logits(params, images_NxHxWx1, model):
    return get_model(model).apply({"params": params}, normalize(images_NxHxWx1, NORM))


def flax_logits(params, images_NxHxWx1: np.ndarray, model: str = "lenet5") -> np.ndarray:
    return np.asarray(_flax_logits(params, jnp.asarray(images_NxHxWx1), model))


def torch_logits(model, images_NxHxWx1: np.ndarray) -> np.ndarray:
    data = tt.to_device_split(images_NxHxWx1, np.zeros(len(images_NxHxWx1), np.int32))
    with torch.no_grad():
        return model(tt.normalize_uint8(data.images_Nx1xHxW, NORM)).numpy()


def assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def max_tree_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------- model and exchange


def test_every_torch_model_is_known_to_the_models_and_the_exchange():
    assert set(TORCH_MODELS) <= set(MODELS)
    assert tuple(tm._CLASSES) == TORCH_MODELS == tuple(exchange.LAYOUTS)


@pytest.mark.parametrize("model", TORCH_MODELS)
def test_torch_model_has_the_flax_param_count_and_layout(model):
    torch_model = tm.make_torch_model(model)
    flax_params = abstract_params(model)
    assert tm.count_torch_params(torch_model) == count_params(flax_params) == PARAM_COUNTS[model]
    layout = exchange.layout(model)
    assert {k: tuple(v.shape) for k, v in torch_model.state_dict().items()} == \
        layout.torch_shapes()
    assert list(torch_model.state_dict()) == list(layout.torch_shapes())  # same order too
    assert jax.tree_util.tree_map(lambda x: x.shape, flax_params) == layout.flax_shapes()
    (_, (n_in, _)), *_ = layout.denses
    assert n_in == int(np.prod(layout.flatten_hwc))


# The logits through the exchange are slow (a compile each) but for LeNet-5's torch weights
# in flax; LeNet-5's round trips and every model's layout stay in the fast set.
FAST_LENET5 = [pytest.param(m, marks=() if m == "lenet5" else pytest.mark.slow)
               for m in TORCH_MODELS]


@pytest.mark.slow
@pytest.mark.parametrize("model", TORCH_MODELS)
def test_flax_weights_in_torch_give_the_same_logits(model):
    params = random_flax_params(0, model)
    images, _ = random_images(16)
    torch_model = tm.make_torch_model(model)
    torch_model.load_state_dict(exchange.flax_to_torch_state_dict(params, model))
    np.testing.assert_allclose(torch_logits(torch_model, images),
                               flax_logits(params, images, model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", FAST_LENET5)
def test_torch_weights_in_flax_give_the_same_logits(model):
    torch_model = tt.make_setup(model=model, seed=3).model  # torch's own init: nonzero biases
    params = exchange.torch_state_dict_to_flax(torch_model.state_dict(), model)
    images, _ = random_images(16, seed=1)
    np.testing.assert_allclose(flax_logits(params, images, model),
                               torch_logits(torch_model, images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", FAST_LENET5)
def test_round_trips_are_bitwise_exact(model):
    params = random_flax_params(5, model)
    assert_trees_equal(exchange.torch_state_dict_to_flax(
        exchange.flax_to_torch_state_dict(params, model), model), params)
    state_dict = tt.make_setup(model=model, seed=7).model.state_dict()
    again = exchange.flax_to_torch_state_dict(exchange.torch_state_dict_to_flax(state_dict, model),
                                              model)
    assert list(again) == list(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(again[name], tensor) and again[name].dtype == tensor.dtype


@pytest.mark.parametrize("hwc", [(5, 5, 16), (7, 7, 32)])  # LeNet-5's and the CNN's fc1 input
def test_fc1_permutation_maps_flax_hwc_to_torch_chw(hwc):
    # Flax row (h * W + w) * C + c must become torch column (c * H + h) * W + w.
    h_, w_, c_ = hwc
    kernel_Ix1 = np.arange(h_ * w_ * c_, dtype=np.float32)[:, None]
    weight_1xI = exchange.fc1_flax_rows_to_torch_columns(kernel_Ix1, hwc)
    for h, w, c in [(0, 0, 1), (1, 2, 3), (h_ - 1, w_ - 1, c_ - 1)]:
        assert weight_1xI[0, (c * h_ + h) * w_ + w] == (h * w_ + w) * c_ + c
    assert np.array_equal(exchange.fc1_torch_columns_to_flax_rows(weight_1xI, hwc), kernel_Ix1)


def test_exchange_rejects_other_models_clearly():
    # Shapes are all the exchange checks, so abstract trees (no init computation) will do.
    cnn_params = abstract_params("cnn")
    with pytest.raises(FmnistError, match="not LeNet-5 params.*they are the cnn model's: pass "
                                          "model='cnn'"):
        exchange.flax_to_torch_state_dict(cnn_params)
    with pytest.raises(FmnistError, match="not tutorial CNN params.*the exchange knows the "
                                          "models lenet5, cnn"):
        exchange.flax_to_torch_state_dict(abstract_params("mlp"), "cnn")
    with pytest.raises(FmnistError, match="PyTorch baseline has no 'mlp' model: use one of "
                                          "lenet5, cnn"):
        exchange.flax_to_torch_state_dict(abstract_params("mlp"), "mlp")
    lenet_variables = jax.eval_shape(LeNet5().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(FmnistError, match=r"pass variables\['params'\]"):
        exchange.flax_to_torch_state_dict(lenet_variables)
    wrong = jax.tree_util.tree_map(lambda x: x, dict(lenet_variables["params"]))
    wrong["fc3"] = {"kernel": jax.ShapeDtypeStruct((84, 7), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((7,), jnp.float32)}
    with pytest.raises(FmnistError, match=r"fc3.kernel has shape \(84, 7\)"):
        exchange.flax_to_torch_state_dict(wrong)
    with pytest.raises(FmnistError, match="not a LeNet-5 state_dict"):
        exchange.torch_state_dict_to_flax(torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(FmnistError, match="not a LeNet-5 state_dict.*pass model='cnn'"):
        exchange.torch_state_dict_to_flax(tm.make_torch_model("cnn").state_dict())
    with pytest.raises(FmnistError, match="PyTorch baseline has no 'mlp' model"):
        tt.make_setup(model="mlp")


def test_compiled_model_state_dict_is_accepted():
    model = tm.TorchLeNet5()
    prefixed = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert_trees_equal(exchange.torch_state_dict_to_flax(prefixed),
                       exchange.torch_state_dict_to_flax(model.state_dict()))


# The batch-order helpers (order.py) are checked end to end against a train.py run in
# tests/test_baseline_order.py::test_order_helpers_reproduce_a_training_run.


# ---------------------------------------------------------------- same steps in both frameworks


@pytest.mark.parametrize("model,batch", [("lenet5", 64), pytest.param("cnn", 32, marks=pytest.mark.slow)])  # their presets' batches
def test_torch_and_jax_take_the_same_adam_steps(model, batch):
    images, labels = random_images(5 * batch + 30, seed=3)  # 5 steps; 30 dropped
    key = jax.random.key(21)
    init_params = random_flax_params(8, model)
    copy = jax.tree_util.tree_map(jnp.array, init_params)  # train_epoch donates its state
    state = create_train_state(get_model(model), optax.adam(1e-3), jax.random.key(0)).replace(
        params=copy, opt_state=optax.adam(1e-3).init(copy))
    jax_state, jax_sums = train_epoch(state, jnp.asarray(images), jnp.asarray(labels), key,
                                      batch_size=batch, norm=HALF)
    batches_SxB = order.jax_epoch_batch_order(key, len(labels), batch)

    tensors = tt.make_setup(model=model, params=init_params)
    tensors_sums = tt.train_epoch_tensors(tensors, tt.to_device_split(images, labels), batches_SxB)
    tensors_params = exchange.torch_state_dict_to_flax(tensors.model.state_dict(), model)
    assert max_tree_diff(tensors_params, jax_state.params) < 1e-4
    assert max_tree_diff(tensors_params, init_params) > 1e-3  # the steps did move the weights
    assert tensors_sums.count == int(jax_sums.count) == 5 * batch
    assert tensors_sums.loss == pytest.approx(float(jax_sums.loss), rel=1e-5)
    assert tensors_sums.correct == int(jax_sums.correct)

    loader_run = tt.make_setup(model=model, params=init_params)
    loader = tt.dataloader(tt.PerSampleDataset(images, labels), batches_SxB=batches_SxB)
    loader_sums = tt.train_epoch_dataloader(loader_run, loader)
    loader_params = exchange.torch_state_dict_to_flax(loader_run.model.state_dict(), model)
    assert max_tree_diff(loader_params, tensors_params) < 1e-6
    assert loader_sums.count == 5 * batch


def test_evaluate_counts_every_example_like_jax():
    images, labels = random_images(1050, seed=4)  # batches of 1000 and 50
    params = random_flax_params(9)
    setup = tt.make_setup(params=params)
    sums = tt.evaluate(setup, tt.to_device_split(images, labels, "cpu"), batch_size=1000)
    state = create_train_state(LeNet5(), optax.adam(1e-3), jax.random.key(0)).replace(params=params)
    jax_sums = evaluate(state, jnp.asarray(images), jnp.asarray(labels), batch_size=1000,
                        norm=HALF)
    assert sums.count == 1050
    assert sums.loss == pytest.approx(float(jax_sums.loss), rel=1e-5)
    assert sums.correct == int(jax_sums.correct)


# ---------------------------------------------------------------- input pipelines


def test_per_sample_dataset_is_to_tensor_plus_normalize():
    images, labels = random_images(150, seed=5)
    dataset = tt.PerSampleDataset(images, labels)
    image, label = dataset[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == int(labels[7])
    expected = (images[7, :, :, 0].astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-7)
    assert image.min() >= -1.0 and image.max() <= 1.0

    batches = list(tt.dataloader(dataset, batch_size=64, seed=0))
    assert [len(y) for _, y in batches] == [64, 64, 22]  # the last partial batch is kept
    assert batches[0][0].shape == (64, 1, 28, 28) and batches[0][1].dtype == torch.int64
    again = list(tt.dataloader(dataset, batch_size=64, seed=0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))  # seeded shuffle
    assert not torch.equal(batches[0][1], torch.from_numpy(labels[:64].astype(np.int64)))


def test_tensors_order_drops_the_partial_batch_and_checks_input():
    batches_SxB = tt.torch_batch_order(150, 64, torch.Generator().manual_seed(0))
    assert batches_SxB.shape == (2, 64) and len(np.unique(batches_SxB)) == 128
    setup = tt.make_setup()
    data = tt.to_device_split(*random_images(150))
    assert data.images_Nx1xHxW.dtype == torch.uint8
    assert data.images_Nx1xHxW.stride() == (784, 784, 28, 1)  # plain NCHW, not channels-last
    with pytest.raises(FmnistError, match="outside the 150 examples"):
        tt.train_epoch_tensors(setup, data, np.array([[0, 150]]))
    with pytest.raises(FmnistError, match=r"uint8 images of shape \(N, 28, 28, 1\)"):
        tt.to_device_split(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int32))
    with pytest.raises(FmnistError, match="use 'cpu' or 'cuda'"):
        tt.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FmnistError, match="sees no CUDA GPU"):
            tt.make_setup(device="cuda")
