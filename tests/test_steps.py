import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.data import HALF
from fmnist_jax.models import get_model
from fmnist_jax.steps import (StepOptions, create_train_state, eval_step_jit, evaluate,
                              normalize, plateau_update, predict_logits, train_epoch,
                              train_step, train_step_jit)
from tests.helpers import SHARED_ADAM, STEP_BATCH, jitted_train_step, make_split
from tests.helpers import step_batch as _batch

# One tx object (see helpers.SHARED_ADAM): every LeNet-5 test below that jits a step or an
# epoch with the same shapes reuses one compiled program, test_ema's too.
_ADAM = SHARED_ADAM


def _state(seed=0):
    return create_train_state(get_model("lenet5"), _ADAM, jax.random.key(seed))


def test_normalization_maps_pixels_to_minus_one_one():
    x = jnp.array([0, 255, 51], jnp.uint8)
    np.testing.assert_allclose(normalize(x, HALF), [-1.0, 1.0, -0.6], atol=1e-6)


def test_train_step_is_pure_and_jit_agrees():
    images, labels = _batch()
    key = jax.random.key(3)
    state = _state()
    s1, m1 = jitted_train_step(state, images, labels, key, HALF)
    s2, m2 = jitted_train_step(state, images, labels, key, HALF)
    chex.assert_trees_all_equal((s1.params, s1.opt_state, m1), (s2.params, s2.opt_state, m2))
    chex.assert_trees_all_equal(state.params, _state().params)  # its input untouched
    # The package's jitted step (it donates the state: a fresh one) on the same shapes as
    # test_loss_falls_when_overfitting_one_batch's, so the two share its compilation.
    s3, m3 = train_step_jit(_state(), images, labels, key, HALF)
    chex.assert_trees_all_equal((s1.params, m1), (s3.params, m3))
    # Eagerly (op by op), on a small user module: eager LeNet-5 costs seconds of op compiles.
    small = create_train_state(PlainClassifier(), _ADAM, jax.random.key(0))
    eager, eager_sums = train_step(small, images, labels, key, HALF)
    jitted, jitted_sums = jitted_train_step(small, images, labels, key, HALF)
    chex.assert_trees_all_close((eager.params, eager_sums), (jitted.params, jitted_sums),
                                rtol=1e-5, atol=1e-6)
    assert int(s1.step) == 1


def test_train_step_does_not_retrace_across_steps():
    images, labels = _batch()
    traced = chex.assert_max_traces(train_step, n=1)
    step_fn = jax.jit(traced, donate_argnums=0)
    state = _state()
    for i in range(4):
        state, _ = step_fn(state, images, labels, jax.random.key(i), HALF)
    assert int(state.step) == 4


def test_loss_falls_when_overfitting_one_batch():
    images, labels = _batch()
    state = _state()
    losses = []
    for i in range(60):
        state, sums = train_step_jit(state, images, labels, jax.random.key(i), HALF)
        losses.append(float(sums.loss / sums.count))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_train_epoch_equals_a_loop_of_train_steps():
    """The scan runs exactly train_step over the permutation it documents; the 200 % 32 = 8
    examples left over are skipped. (200 images in batches of STEP_BATCH, as in
    test_same_seed_same_epoch: one compiled epoch and one compiled step for both.)"""
    assert STEP_BATCH == 32
    images, labels = _batch(200)
    key = jax.random.key(7)
    scanned, sums = train_epoch(_state(), images, labels, key, batch_size=32, norm=HALF)
    perm_key, step_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, 200))[:192].reshape(6, 32)
    state, step_keys = _state(), jax.random.split(step_key, 6)
    for idx, k in zip(order, step_keys):
        state, _ = train_step_jit(state, images[idx], labels[idx], k, HALF)
    chex.assert_trees_all_close(scanned.params, state.params, rtol=1e-5, atol=1e-6)
    assert int(sums.count) == 192 and int(scanned.step) == 6


def test_evaluate_counts_every_example_with_a_partial_batch():
    split = make_split(1003, seed=5)
    images, labels = jnp.asarray(split.images_NxHxWx1), jnp.asarray(split.labels_N)
    state = _state()  # a few steps away from the initial weights (the shared compiled step)
    for i in range(5):
        state, _ = train_step_jit(state, images[:STEP_BATCH], labels[:STEP_BATCH],
                                  jax.random.key(i), HALF)
    sums = evaluate(state, images, labels, batch_size=100, norm=HALF)  # 10 full batches + 3
    logits = np.asarray(predict_logits(state, images, batch_size=100, norm=HALF))
    assert logits.shape == (1003, 10)
    assert int(sums.count) == 1003
    assert int(sums.correct) == int(np.sum(logits.argmax(-1) == split.labels_N))
    reference_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    np.testing.assert_allclose(float(sums.loss), float(reference_loss), rtol=1e-5)


def test_eval_step_ignores_masked_examples():
    images, labels = _batch(8)
    mask = jnp.arange(8) < 5
    full = eval_step_jit(_state(), images[:5], labels[:5], jnp.ones(5, bool), HALF)
    masked = eval_step_jit(_state(), images, labels, mask, HALF)
    chex.assert_trees_all_close(full, masked, rtol=1e-6)


def test_same_seed_same_epoch():
    images, labels = _batch(200)  # test_train_epoch_equals_a_loop_of_train_steps' shapes
    a, _ = train_epoch(_state(), images, labels, jax.random.key(1), batch_size=32, norm=HALF)
    b, _ = train_epoch(_state(), images, labels, jax.random.key(1), batch_size=32, norm=HALF)
    chex.assert_trees_all_equal(a.params, b.params)
    c, _ = train_epoch(_state(), images, labels, jax.random.key(2), batch_size=32, norm=HALF)
    assert not np.allclose(a.params["fc3"]["bias"], c.params["fc3"]["bias"])


# --- models with BatchNorm and dropout, and models users bring -------------------------

def _mlp_state(seed=0):
    return create_train_state(get_model("mlp"), _ADAM, jax.random.key(seed))


@pytest.mark.slow
def test_batchnorm_statistics_move_in_training_and_not_in_evaluation():
    images, labels = _batch()
    state = _mlp_state()
    before = state.batch_stats
    trained, _ = jitted_train_step(state, images, labels, jax.random.key(1), HALF)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), before,
                                   trained.batch_stats)
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every mean and var moved
    evaluate(trained, images, labels, batch_size=16, norm=HALF)  # two batches
    predict_logits(trained, images, batch_size=32, norm=HALF)  # compiled for the next test too
    chex.assert_trees_all_equal(trained.batch_stats, jitted_train_step(
        state, images, labels, jax.random.key(1), HALF)[0].batch_stats)  # pure: no side effect


def test_evaluation_uses_the_running_statistics_not_the_batch():
    images, labels = _batch()
    state = _mlp_state()
    one = predict_logits(state, images[:1], batch_size=1, norm=HALF)
    many = predict_logits(state, images, batch_size=32, norm=HALF)
    np.testing.assert_allclose(one[0], many[0], rtol=1e-5, atol=1e-5)  # batch-independent


@pytest.mark.slow
def test_dropout_differs_between_keys_and_is_off_in_evaluation():
    images, labels = _batch()
    state = _mlp_state()
    a, _ = jitted_train_step(state, images, labels, jax.random.key(1), HALF)
    b, _ = jitted_train_step(state, images, labels, jax.random.key(2), HALF)
    c, _ = jitted_train_step(state, images, labels, jax.random.key(1), HALF)
    assert not np.allclose(a.params["fc1"]["kernel"], b.params["fc1"]["kernel"])
    chex.assert_trees_all_equal(a.params, c.params)
    x = normalize(images, HALF)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # Jitted (eagerly, the MLP's every op compiles on its own: seconds).
    eval_apply = jax.jit(lambda v, x: get_model("mlp").apply(v, x, train=False))
    eval_1 = eval_apply(variables, x)
    eval_2 = eval_apply(variables, x)
    np.testing.assert_array_equal(eval_1, eval_2)
    train_1 = jax.jit(lambda v, x: get_model("mlp").apply(
        v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])[0])(
        variables, x)
    assert not np.allclose(train_1, eval_1)


class PlainClassifier(nn.Module):
    """A user's own module: no `train` keyword, no BatchNorm, no dropout."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_a_users_plain_module_trains_through_the_steps():
    split = make_split(256)
    images, labels = jnp.asarray(split.images_NxHxWx1), jnp.asarray(split.labels_N)
    state = create_train_state(PlainClassifier(), optax.adam(1e-2), jax.random.key(0))
    assert not state.takes_train and state.batch_stats == {}
    first = evaluate(state, images, labels, batch_size=64, norm=HALF)
    state, _ = train_step(state, images[:32], labels[:32], jax.random.key(1), HALF)
    for epoch in range(3):
        state, _ = train_epoch(state, images, labels, jax.random.key(epoch), batch_size=32,
                               norm=HALF)
    last = evaluate(state, images, labels, batch_size=64, norm=HALF)
    assert float(last.loss) < 0.5 * float(first.loss)
    assert int(state.step) == 1 + 3 * 8


def test_label_smoothing_is_optax_smooth_labels():
    images, labels = _batch()
    state = _state()
    _, sums = jitted_train_step(state, images, labels, jax.random.key(0), HALF,
                                StepOptions(label_smoothing=0.1))
    logits = predict_logits(state, images, batch_size=STEP_BATCH, norm=HALF)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1)
    expected = optax.softmax_cross_entropy(logits, targets).sum()
    np.testing.assert_allclose(float(sums.loss), float(expected), rtol=1e-5)


class FiveClasses(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_predict_logits_keeps_the_models_number_of_classes():
    images = jnp.asarray(make_split(70).images_NxHxWx1)
    state = create_train_state(FiveClasses(), _ADAM, jax.random.key(0))
    logits_NxC = predict_logits(state, images, batch_size=30, norm=HALF)
    assert logits_NxC.shape == (70, 5)
    np.testing.assert_allclose(logits_NxC, state.apply_fn({"params": state.params},
                                                          normalize(images, HALF)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x.astype(jnp.float32) / 255, y), "images must be uint8 pixels 0..255 .*, "
                                                    "got float32: pass the raw pixels"),
    (lambda x, y: (x[..., 0], y), rf"images must be \(N, 28, 28, 1\), got shape \({STEP_BATCH}, "
                                  rf"28, 28\): give each 28 x 28 image its channel axis"),
    (lambda x, y: (x, jax.nn.one_hot(y, 10)), "labels must be integer class indices, got "
                                              "float32: pass labels.argmax"),
    (lambda x, y: (x, y[:20]), rf"{STEP_BATCH} images and labels of shape \(20,\): pass one "
                               rf"label per image, shape \({STEP_BATCH},\)"),
])
def test_the_steps_name_inputs_they_do_not_take(change, message):
    images, labels = change(*_batch())
    state = create_train_state(PlainClassifier(), _ADAM, jax.random.key(0))
    with pytest.raises(FmnistError, match=message):
        jitted_train_step(state, images, labels, jax.random.key(1), HALF)
    with pytest.raises(FmnistError, match=message):
        evaluate(state, images, labels, batch_size=16, norm=HALF)
    with pytest.raises(FmnistError, match=message):
        train_epoch(state, images, labels, jax.random.key(1), batch_size=16, norm=HALF)


def test_an_epoch_without_a_full_batch_or_a_bad_state_is_refused():
    images, labels = _batch()
    state = create_train_state(PlainClassifier(), _ADAM, jax.random.key(0))
    with pytest.raises(FmnistError, match=f"batch size 64 is more than the {STEP_BATCH} "
                                          f"images: .* at most {STEP_BATCH}"):
        train_epoch(state, images, labels, jax.random.key(1), batch_size=64, norm=HALF)
    with pytest.raises(FmnistError, match="batch size must be at least 1, got 0"):
        predict_logits(state, images, batch_size=0, norm=HALF)
    with pytest.raises(FmnistError, match="no plateau schedule to advance: pass plateau_tx"):
        plateau_update(state, jnp.float32(1.0))
    with pytest.raises(FmnistError, match="key must be a jax.random key, got 0"):
        create_train_state(PlainClassifier(), _ADAM, 0)

    class Layers(nn.Module):
        widths: list

        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    with pytest.raises(FmnistError, match=r"the model Layers cannot be hashed, as jit needs: .*\(a tuple, not "
                                          r"a list\)"):
        create_train_state(Layers([64]), _ADAM, jax.random.key(0))
    # A plain (mean, std) pair normalizes as a Normalization does.
    np.testing.assert_array_equal(normalize(images, tuple(HALF)), normalize(images, HALF))


def test_the_mlp_trains_with_float64_as_the_default_dtype():
    images, labels = _batch()
    with jax.enable_x64(True):
        state = create_train_state(get_model("mlp"), _ADAM, jax.random.key(0))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {
            jnp.dtype("float32")}
        state, sums = train_epoch(state, images, labels.astype(jnp.int64), jax.random.key(1),
                                  batch_size=16, norm=HALF)
    assert int(sums.count) == STEP_BATCH
