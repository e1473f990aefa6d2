"""models.py: parameter counts and layouts, inits, BatchNorm as torch's, and each model's
logits and gradients against the same model written with flax's own layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.models import LeNet5, TutorialCNN, count_params, get_model
from fmnist_jax.steps import init_params, init_variables
from tests.helpers import FlaxLeNet5, assert_model_equals_flax

LENET5_PARAMS = 61_706  # the report's layer table: 156 + 2,416 + 48,120 + 10,164 + 850
CNN_PARAMS = 206_922  # the tutorial's: 160 + 4,640 + 200,832 + 1,290
LENET5_GAP_PARAMS = 2_742  # 156 + 2,416 + 16 * 10 + 10
# The notebook's print: dense 401,920 + 131,328 + 32,896 + 1,290, BatchNorm scale and bias
# 1,024 + 512 + 256 (running statistics are not parameters).
MLP_PARAMS = 569_226


@pytest.mark.parametrize("name,expected", [("lenet5", LENET5_PARAMS), ("cnn", CNN_PARAMS),
                                           ("lenet5-gap", LENET5_GAP_PARAMS),
                                           ("mlp", MLP_PARAMS)])
def test_param_count_and_output_shape(name, expected):
    model = get_model(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(variables["params"]) == expected
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((3, 28, 28, 1)))
    assert logits.shape == (3, 10)


def test_lenet5_layer_shapes():
    params = jax.eval_shape(get_model("lenet5").init, jax.random.key(0),
                            jnp.zeros((1, 28, 28, 1)))["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes == {
        "conv1": {"kernel": (5, 5, 1, 6), "bias": (6,)},
        "conv2": {"kernel": (5, 5, 6, 16), "bias": (16,)},
        "fc1": {"kernel": (400, 120), "bias": (120,)},
        "fc2": {"kernel": (120, 84), "bias": (84,)},
        "fc3": {"kernel": (84, 10), "bias": (10,)},
    }


class _FlaxCNN(nn.Module):
    """TutorialCNN written with nn.Conv and nn.max_pool."""

    @nn.compact
    def __call__(self, x, *, train=False):
        pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
        x = pool(nn.relu(nn.Conv(16, (3, 3), padding=1, name="conv1")(x)))
        x = pool(nn.relu(nn.Conv(32, (3, 3), padding=1, name="conv2")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


@pytest.mark.parametrize("ours,ref", [(LeNet5(), FlaxLeNet5()), (TutorialCNN(), _FlaxCNN())],
                         ids=["lenet5", "cnn"])
def test_whole_model_logits_and_grads_equal_flax(ours, ref):
    assert_model_equals_flax(ours, ref)


def test_unknown_model_is_a_user_error():
    with pytest.raises(FmnistError, match="unknown model 'resnet'"):
        get_model("resnet")


@pytest.mark.parametrize("layer,fan_out", [("fc1", 512), ("fc2", 256), ("fc3", 128),
                                           ("fc4", 10)])
def test_mlp_init_is_kaiming_normal_fan_out_with_zero_biases(layer, fan_out):
    # The notebook: kaiming_normal_(mode="fan_out", nonlinearity="relu") and a zero bias on
    # every nn.Linear, the output layer's too; BatchNorm's scale 1 and bias 0. The package's
    # jitted init (what training starts from), compiled once for all four cases and shared
    # with the MLP tests of test_steps.
    params = init_params(get_model("mlp"), jax.random.key(0))
    kernel = np.asarray(params[layer]["kernel"])  # (fan_in, fan_out)
    assert kernel.shape[1] == fan_out
    std = np.sqrt(2 / fan_out)
    assert abs(kernel.mean()) < 0.05 * std
    assert kernel.std() == pytest.approx(std, rel=0.1 if fan_out == 10 else 0.02)
    assert np.abs(kernel).max() > 3.2 * std  # untruncated, like torch's normal_
    np.testing.assert_array_equal(params[layer]["bias"], 0.0)
    if layer != "fc4":
        np.testing.assert_array_equal(params[layer.replace("fc", "bn")]["scale"], 1.0)
        np.testing.assert_array_equal(params[layer.replace("fc", "bn")]["bias"], 0.0)


def test_mlp_batchnorm_keeps_torchs_running_statistics():
    # torch's BatchNorm1d: running = 0.9 running + 0.1 batch (flax would need momentum 0.9,
    # not its default 0.99), with the batch's unbiased variance (flax's BatchNorm uses the
    # biased one); the training output is normalized by the biased variance, eps 1e-5.
    # The package's jitted init (shared with the other MLP tests) and a jitted training
    # apply: eagerly, each compiles op by op, about 7 s together.
    x = jax.random.normal(jax.random.key(1), (64, 28, 28, 1))
    model = get_model("mlp")
    variables = init_variables(model, jax.random.key(0))
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)
    _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                  rngs={"dropout": jax.random.key(2)},
                                                  mutable=["batch_stats"]))(variables, x)
    fc1 = variables["params"]["fc1"]
    h = (np.asarray(x, np.float64).reshape(64, -1) @ np.asarray(fc1["kernel"], np.float64)
         + np.asarray(fc1["bias"], np.float64))
    stats = updated["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-4)


def test_batchnorm1d_matches_torch_in_training_and_evaluation():
    torch = pytest.importorskip("torch")
    from fmnist_jax.models import BatchNorm1d

    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, (64, 5)).astype(np.float32) for _ in range(3)]
    ours = BatchNorm1d()
    variables = ours.init(jax.random.key(0), jnp.asarray(batches[0]), train=False)
    theirs = torch.nn.BatchNorm1d(5)
    theirs.train()
    for batch in batches:
        out, updated = ours.apply(variables, jnp.asarray(batch), train=True,
                                  mutable=["batch_stats"])
        variables = {**variables, **updated}
        np.testing.assert_allclose(out, theirs(torch.from_numpy(batch)).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], theirs.running_mean.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["var"], theirs.running_var.numpy(),
                               rtol=1e-5)
    theirs.eval()
    np.testing.assert_allclose(ours.apply(variables, jnp.asarray(batches[0]), train=False),
                               theirs(torch.from_numpy(batches[0])).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
