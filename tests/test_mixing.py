"""Mixing (`--mixup-alpha`, `--cutmix-alpha`): the mixed batch exactly as described, the step's
loss against a direct computation (with and without a teacher), a sweep member with both
alphas 0 training as the plain step does, bad values refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import data
from fmnist_jax.augment import mix_batch
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.run.presets import get_config
from fmnist_jax.steps import (MIX_KEY, StepOptions, create_train_state, predict_logits_step,
                              train_step)
from tests.helpers import SHARED_ADAM, STEP_BATCH, step_batch

# Image i is the constant i + 1: each pixel of a mixed image tells whose it is.
CONSTANT_BxHxWx1 = jnp.broadcast_to(
    jnp.arange(1, STEP_BATCH + 1, dtype=jnp.float32)[:, None, None, None], (STEP_BATCH, 28, 28, 1))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mixup_blends_each_image_with_its_partner():
    mix = mix_batch(CONSTANT_BxHxWx1, jax.random.key(0), 0.4, 0.0)
    partner_B, share = np.asarray(mix.partner_B), float(mix.share)
    assert sorted(partner_B) == list(range(STEP_BATCH)) and 0 < share < 1
    own_B = np.arange(1, STEP_BATCH + 1, dtype=np.float32)
    want_B = share * own_B + (1 - share) * own_B[partner_B]
    np.testing.assert_allclose(np.asarray(mix.images_BxHxWx1)[:, 5, 7, 0], want_B, rtol=1e-6)
    assert np.ptp(np.asarray(mix.images_BxHxWx1), axis=(1, 2, 3)).max() == 0  # uniform blend


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_one_box_whose_area_is_the_partners_share(seed):
    mix = mix_batch(CONSTANT_BxHxWx1, jax.random.key(seed), 0.0, 1.0)
    images_BxHxW = np.asarray(mix.images_BxHxWx1)[..., 0]
    partner_B, share = np.asarray(mix.partner_B), float(mix.share)
    own_B = np.arange(1, STEP_BATCH + 1)
    from_partner_BxHxW = images_BxHxW == own_B[partner_B][:, None, None]
    assert np.all(from_partner_BxHxW | (images_BxHxW == own_B[:, None, None]))
    moved = partner_B != np.arange(STEP_BATCH)
    box_HxW = from_partner_BxHxW[np.argmax(moved)]
    assert np.all(from_partner_BxHxW[moved] == box_HxW)  # one box for the whole batch
    rows, cols = np.nonzero(box_HxW)
    if rows.size:  # a rectangle: every pixel between its extremes is in it
        assert box_HxW[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert share == pytest.approx(1 - box_HxW.mean(), abs=1e-6)


def test_both_alphas_pick_mixup_or_cutmix_per_batch_and_zero_is_identity():
    kinds = set()
    for seed in range(12):
        mix = mix_batch(CONSTANT_BxHxWx1, jax.random.key(seed), 0.4, 1.0)
        whole = np.all(np.mod(np.asarray(mix.images_BxHxWx1), 1) == 0)
        kinds.add("cutmix" if whole else "mixup")
    assert kinds == {"cutmix", "mixup"}
    images, _ = step_batch()
    off = mix_batch(images, jax.random.key(0), 0.0, 0.0)
    assert float(off.share) == 1.0
    np.testing.assert_array_equal(off.images_BxHxWx1, images.astype(jnp.float32))


def _step(state, images, labels, options, teacher_BxC=None, key=jax.random.key(1)):
    return jax.jit(train_step, static_argnames="options")(
        state, images, labels, key, data.HALF, options, teacher_BxC)


def test_the_step_minimizes_the_shared_cross_entropy_and_mixes_the_teacher():
    images, labels = step_batch()
    state = create_train_state(get_model("lenet5"), SHARED_ADAM, jax.random.key(0))
    rng = np.random.default_rng(0)
    teacher_BxC = _log_softmax(rng.normal(size=(len(labels), 10)) * 3).astype(np.float32)
    weight, temperature = 0.3, 2.0
    options = StepOptions(mixup_alpha=0.4, distill_weight=weight,
                          distill_temperature=temperature)
    # A step whose image keeps the smaller share: a hit is then its partner's label.
    key = next(k for k in map(jax.random.key, range(50))
               if mix_batch(images, jax.random.fold_in(k, MIX_KEY), 0.4, 0.0).share < 0.4)
    _, sums = _step(state, images, labels, options, jnp.asarray(teacher_BxC), key)
    mix = mix_batch(images, jax.random.fold_in(key, MIX_KEY), 0.4, 0.0)
    partner_B, share = np.asarray(mix.partner_B), float(mix.share)
    logits = np.asarray(predict_logits_step(state, mix.images_BxHxWx1, data.HALF), np.float64)
    logprobs = _log_softmax(logits)
    labels_B, rows = np.asarray(labels), np.arange(len(labels))
    ce = -(share * logprobs[rows, labels_B] + (1 - share) * logprobs[rows, labels_B[partner_B]])
    teacher_probs = share * np.exp(teacher_BxC) + (1 - share) * np.exp(teacher_BxC[partner_B])
    kl = (teacher_probs * (np.log(teacher_probs) - _log_softmax(logits / temperature))).sum(-1)
    want = (weight * kl * temperature ** 2 + (1 - weight) * ce).sum()
    assert float(sums.loss) == pytest.approx(want, rel=1e-5)
    assert int(sums.correct) == (np.argmax(logits, -1) == labels_B[partner_B]).sum()
    assert int(sums.correct) != (np.argmax(logits, -1) == labels_B).sum()


def test_a_sweep_member_with_both_alphas_zero_steps_as_without_mixing():
    images, labels = step_batch()
    plain = create_train_state(get_model("lenet5"), SHARED_ADAM, jax.random.key(0))
    member = plain.replace(hparams={"mixup_alpha": jnp.float32(0), "cutmix_alpha": jnp.float32(0)})
    want_state, want = _step(plain, images, labels, StepOptions())
    got_state, got = _step(member, images, labels, StepOptions(mixup_alpha=0.2, cutmix_alpha=1.0))
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-6)
    assert int(got.correct) == int(want.correct)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           got_state.params, want_state.params)
    # ... and a member with an alpha on does mix.
    member = plain.replace(hparams={"mixup_alpha": jnp.float32(0.2),
                                    "cutmix_alpha": jnp.float32(0)})
    _, mixed = _step(member, images, labels, StepOptions(mixup_alpha=0.2, cutmix_alpha=1.0))
    assert float(mixed.loss) != pytest.approx(float(want.loss), rel=1e-3)


@pytest.mark.parametrize("field", ["mixup_alpha", "cutmix_alpha"])
def test_a_negative_alpha_is_refused_naming_it(field):
    with pytest.raises(FmnistError, match=f"{field.replace('_', ' ')} must be >= 0, got -1"):
        get_config(**{field: -1.0})


def test_the_alphas_are_sweepable_and_name_their_folders():
    cfg = get_config(sweep="mixup_alpha=0,0.2;cutmix_alpha=0,1")
    assert cfg.member_names()[1] == "mixup=0,cutmix=1/seed-0"
