"""On-device augmentation: shapes, ranges, keys, identity at zero, exact geometry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax.augment import NONE, Augment, affine, augment_batch
from fmnist_jax.data import HALF
from fmnist_jax.models import get_model
from fmnist_jax.steps import StepOptions, create_train_state, train_epoch
from tests.helpers import STEP_BATCH, jitted_train_step, make_split

NOTEBOOK = Augment(rotation_degrees=10, flip_prob=0.1, translate_fraction=0.1)
EVERYTHING = Augment(rotation_degrees=30, flip_prob=0.5, translate_fraction=0.2, crop_padding=4,
                     erasing_prob=0.5)


# Every batch here has STEP_BATCH images: augment_batch runs eagerly, and JAX compiles each
# eager op once per shape, so one shape lets each test reuse what the ones before compiled
# (the augmented train step below included).
@pytest.fixture(scope="module")
def images_BxHxWx1():
    return jnp.asarray(make_split(STEP_BATCH, seed=3).images_NxHxWx1)


@pytest.mark.parametrize("aug", [NOTEBOOK, EVERYTHING])
def test_shape_dtype_range_and_same_key_same_images(images_BxHxWx1, aug):
    out = augment_batch(images_BxHxWx1, jax.random.key(0), aug)
    assert out.shape == images_BxHxWx1.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    np.testing.assert_array_equal(out, augment_batch(images_BxHxWx1, jax.random.key(0), aug))
    other = augment_batch(images_BxHxWx1, jax.random.key(1), aug)
    assert not np.array_equal(out, other)


def test_each_image_gets_its_own_draw():
    same_BxHxWx1 = jnp.tile(jnp.asarray(make_split(1, seed=5).images_NxHxWx1),
                            (STEP_BATCH, 1, 1, 1))
    out = np.asarray(augment_batch(same_BxHxWx1, jax.random.key(0), EVERYTHING))
    assert len({out[i].tobytes() for i in range(STEP_BATCH)}) == STEP_BATCH


def test_zero_strength_is_the_identity(images_BxHxWx1):
    zero = Augment(0.0, 0.0, 0.0, 0, 0.0)
    assert not zero.active and zero == NONE
    out = augment_batch(images_BxHxWx1, jax.random.key(7), zero)
    np.testing.assert_array_equal(out, np.asarray(images_BxHxWx1, np.float32))


def test_a_quarter_turn_is_rot90_and_a_flip_is_fliplr():
    image_HxW = np.zeros((28, 28), np.float32)
    image_HxW[2:6, 3:20] = 200.0  # an asymmetric bar and a dot
    image_HxW[10, 25] = 99.0
    turned = affine(jnp.asarray(image_HxW), jnp.float32(np.pi / 2), False, jnp.zeros(2))
    np.testing.assert_allclose(turned, np.rot90(image_HxW), atol=1e-3)
    flipped = affine(jnp.asarray(image_HxW), jnp.float32(0.0), True, jnp.zeros(2))
    np.testing.assert_array_equal(flipped, np.fliplr(image_HxW))


def test_a_whole_pixel_shift_moves_pixels_and_fills_zeros():
    image_HxW = np.arange(1, 28 * 28 + 1, dtype=np.float32).reshape(28, 28)
    shifted = np.asarray(affine(jnp.asarray(image_HxW), jnp.float32(0.0), False,
                                jnp.array([2.0, -3.0])))
    np.testing.assert_array_equal(shifted[2:, :25], image_HxW[:26, 3:])
    np.testing.assert_array_equal(shifted[:2], 0.0)
    np.testing.assert_array_equal(shifted[:, 25:], 0.0)


def test_erasing_blacks_out_one_rectangle():
    ones_BxHxWx1 = jnp.full((STEP_BATCH, 28, 28, 1), 255, jnp.uint8)
    out = np.asarray(augment_batch(ones_BxHxWx1, jax.random.key(0), Augment(erasing_prob=1.0)))
    for image_HxW in out[..., 0]:
        rows, cols = np.nonzero(image_HxW == 0)
        area = len(rows)
        assert 0.02 * 784 * 0.5 <= area <= 0.33 * 784 * 1.5
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


@pytest.mark.slow
def test_augmented_training_runs_in_the_epoch_scan_and_changes_the_step():
    split = make_split(128)
    images, labels = jnp.asarray(split.images_NxHxWx1), jnp.asarray(split.labels_N)
    import optax

    tx = optax.adam(1e-3)
    state = create_train_state(get_model("lenet5"), tx, jax.random.key(0))
    b = STEP_BATCH
    plain, _ = jitted_train_step(state, images[:b], labels[:b], jax.random.key(1), HALF)
    augmented, _ = jitted_train_step(state, images[:b], labels[:b], jax.random.key(1), HALF,
                                     StepOptions(augment=NOTEBOOK))
    assert not np.allclose(plain.params["fc3"]["kernel"], augmented.params["fc3"]["kernel"])
    state, sums = train_epoch(state, images, labels, jax.random.key(2), batch_size=32, norm=HALF,
                              options=StepOptions(augment=EVERYTHING))
    assert int(sums.count) == 128 and np.isfinite(float(sums.loss))


@pytest.mark.parametrize("angle_degrees,flip,shift", [(10.0, False, (3.0, -3.0)),
                                                       (-9.0, True, (-2.0, 3.0)),
                                                       (7.5, False, (0.0, 2.0))])
def test_one_warp_equals_the_notebooks_transforms_one_after_the_other(angle_degrees, flip,
                                                                      shift):
    # torchvision applies RandomRotation, then the flip, then RandomAffine's shift, each to the
    # previous one's 28x28 output: what the shift brings in from outside that frame is 0, even
    # where the rotation's inverse map would land inside the original image (near the corners
    # of an image that has content up to its border, as many Fashion-MNIST items do).
    image_HxW = jnp.asarray(np.random.default_rng(0).uniform(1, 255, (28, 28)), jnp.float32)
    angle = jnp.float32(np.radians(angle_degrees))
    rotated_then_flipped = affine(image_HxW, angle, flip, jnp.zeros(2))
    step_by_step = affine(rotated_then_flipped, jnp.float32(0.0), False, jnp.array(shift))
    np.testing.assert_array_equal(affine(image_HxW, angle, flip, jnp.array(shift)),
                                  step_by_step)


def test_a_crop_after_a_shift_fills_both_revealed_strips_with_zeros():
    # Shift right by 2, then a crop that moves the frame 2 back: torchvision's zero fill of the
    # first step stays 0 in the second, so columns 0-1 are black, not the original columns.
    image_HxW = jnp.full((28, 28), 100.0, jnp.float32)
    out = np.asarray(affine(image_HxW, jnp.float32(0.0), False, jnp.array([0.0, 2.0]),
                            jnp.array([0.0, -2.0])))
    np.testing.assert_array_equal(out[:, 26:], 0.0)  # the crop's strip
    np.testing.assert_array_equal(out[:, :24], 100.0)
