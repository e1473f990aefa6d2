"""Data augmentation on the device: pure, batched, each image with its own key.

`augment_batch(images_BxHxWx1, key, aug)` draws for every image (the notebook's order):
a rotation by an angle uniform in +-`rotation_degrees` about the centre, a horizontal flip with
probability `flip_prob`, a translation uniform in +-`translate_fraction` of the size per axis,
plus, for "random crop after zero padding", an integer shift uniform in +-`crop_padding`
pixels (cropping a 28x28 window out of the image padded by p is exactly that shift), applied
after the translation; then, with probability `erasing_prob`, a rectangle of 2%-33% of the
area, aspect ratio 0.3-3.3, set to 0 (random erasing). Pixels that come from outside the
image are 0 (black), as torchvision fills them.

The geometric part is one affine map per image, sampled with nearest-neighbour interpolation
and translations rounded to whole pixels: torchvision's defaults for RandomRotation and
RandomAffine, and one gather per pixel; what any step brings in from outside its 28x28 frame
is 0, as when torchvision applies the transforms one after the other (`affine`). Not
bilinear sampling (`jax.scipy.ndimage.map_coordinates` order 1): its four gathers and their
weights cost more on a CPU than the notebook's MLP step itself (BENCHMARKS.md), for no gain
the notebook's recipe asks for. With every strength 0 the output equals the input.

`mix_batch` mixes the images of a batch in pairs (mixup, cutmix): it acts on the batch, not
on each image, and the step mixes the targets with the same share (`steps.train_step`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Random erasing's ranges: torchvision RandomErasing's defaults.
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)


class Augment(NamedTuple):
    """Strengths of each augmentation; all 0 is none. Hashable: jit takes it as static. In a
    sweep, `train_step` fills in arrays, each member's own strengths."""

    rotation_degrees: float = 0.0
    flip_prob: float = 0.0
    translate_fraction: float = 0.0
    crop_padding: int = 0
    erasing_prob: float = 0.0

    @property
    def active(self) -> bool:
        return any(v != 0 for v in self)


NONE = Augment()


def augment_batch(images_BxHxWx1: jax.Array, key: jax.Array, aug: Augment) -> jax.Array:
    """The augmented images as float32 (B, H, W, 1) on the 0..255 scale."""
    keys_B = jax.random.split(key, images_BxHxWx1.shape[0])
    images_BxHxW = images_BxHxWx1[..., 0].astype(jnp.float32)
    return jax.vmap(_augment_one, in_axes=(0, 0, None))(images_BxHxW, keys_B, aug)[..., None]


def _augment_one(image_HxW: jax.Array, key: jax.Array, aug: Augment) -> jax.Array:
    h, w = image_HxW.shape
    rot_key, flip_key, shift_key, crop_key, erase_key = jax.random.split(key, 5)
    max_angle = aug.rotation_degrees * (math.pi / 180)  # math.radians's; works on arrays too
    angle = jax.random.uniform(rot_key, minval=-max_angle, maxval=max_angle)
    flip = jax.random.bernoulli(flip_key, aug.flip_prob)
    translate_2 = jnp.round(jax.random.uniform(shift_key, (2,), minval=-1.0, maxval=1.0) * (
        aug.translate_fraction * jnp.array([h, w], jnp.float32)))  # whole pixels, as torchvision
    crop_2 = jax.random.randint(crop_key, (2,), -aug.crop_padding,
                                aug.crop_padding + 1).astype(jnp.float32)
    image_HxW = affine(image_HxW, angle, flip, translate_2, crop_2)
    if not isinstance(aug.erasing_prob, (int, float)) or aug.erasing_prob > 0:  # an array: swept
        image_HxW = _erase(image_HxW, erase_key, aug.erasing_prob)
    return image_HxW


def affine(image_HxW: jax.Array, angle: jax.Array, flip: jax.Array,
           *shifts_2: jax.Array) -> jax.Array:
    """Rotate by `angle` radians (counter-clockwise as displayed, about the centre), flip left
    and right if `flip`, then shift by each of `shifts_2` (rows, columns; whole pixels) in
    turn; zero fill.

    One gather, yet the same pixels as doing the steps one after the other on 28x28 images,
    as torchvision's transforms do: each output pixel takes the input pixel nearest to the
    inverse map of its centre, and is 0 if the map leaves the frame at any step. (Checking
    only the last step, the rotation's, would let a shift reveal rotated-in corners of the
    original image where torchvision's shift reveals black.)
    """
    h, w = image_HxW.shape
    r, c = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
    inside = jnp.ones((h, w), bool)
    # Undo the shifts, last first, each from a frame that the previous step filled ...
    for shift_2 in reversed(shifts_2):
        r, c = r - shift_2[0], c - shift_2[1]
        inside &= _in_frame(r, c, h, w)
    # ... then the flip (the frame onto itself), then the rotation.
    c = jnp.where(flip, (w - 1) - c, c)
    centre_r, centre_c = (h - 1) / 2.0, (w - 1) / 2.0
    dr, dc = r - centre_r, c - centre_c
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Rows grow downwards, so a counter-clockwise turn on screen maps (dr, dc) to
    # (cos dr - sin dc, sin dr + cos dc); its inverse is the transpose.
    src_r = jnp.round(cos * dr + sin * dc + centre_r)
    src_c = jnp.round(-sin * dr + cos * dc + centre_c)
    inside &= _in_frame(src_r, src_c, h, w)
    flat_index = (jnp.clip(src_r, 0, h - 1).astype(jnp.int32) * w
                  + jnp.clip(src_c, 0, w - 1).astype(jnp.int32))
    return jnp.where(inside, image_HxW.reshape(-1)[flat_index], 0.0)


def _in_frame(r: jax.Array, c: jax.Array, h: int, w: int) -> jax.Array:
    """Whether the pixel nearest to (r, c) is one of the h x w image's."""
    r, c = jnp.round(r), jnp.round(c)
    return (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)


def _erase(image_HxW: jax.Array, key: jax.Array, prob: float) -> jax.Array:
    """With probability `prob`, zero a random rectangle (area and aspect as torchvision's)."""
    h, w = image_HxW.shape
    on_key, area_key, aspect_key, top_key, left_key = jax.random.split(key, 5)
    area = jax.random.uniform(area_key, minval=ERASE_AREA[0], maxval=ERASE_AREA[1]) * h * w
    log_aspect = jax.random.uniform(aspect_key, minval=math.log(ERASE_ASPECT[0]),
                                    maxval=math.log(ERASE_ASPECT[1]))
    aspect = jnp.exp(log_aspect)
    eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
    top = jax.random.randint(top_key, (), 0, h - eh + 1)
    left = jax.random.randint(left_key, (), 0, w - ew + 1)
    rows_H, cols_W = jnp.arange(h), jnp.arange(w)
    inside_HxW = (((rows_H >= top) & (rows_H < top + eh))[:, None]
                  & ((cols_W >= left) & (cols_W < left + ew))[None, :])
    erase = jax.random.bernoulli(on_key, prob)
    return jnp.where(erase & inside_HxW, 0.0, image_HxW)


class Mix(NamedTuple):
    """A batch mixed by `mix_batch`: each image i is `share` of its own and 1 - `share` of
    image `partner_B[i]`'s, and so are its targets."""

    images_BxHxWx1: jax.Array
    partner_B: jax.Array
    share: jax.Array  # a scalar in [0, 1], one for the whole batch


def mix_batch(images_BxHxWx1: jax.Array, key: jax.Array, mixup_alpha, cutmix_alpha) -> Mix:
    """Mix each image with another of the batch (a random permutation), one share for the
    whole batch, as the papers and timm do. mixup (Zhang et al., 2018): the pixels
    `share x + (1 - share) partner`, share ~ Beta(mixup_alpha, mixup_alpha). cutmix (Yun et
    al., 2019): a box of the partner pasted over the image, its area 1 - lam of the image for
    lam ~ Beta(cutmix_alpha, cutmix_alpha), its centre uniform, clipped at the borders; the
    share is the part of the image left uncovered. With both alphas above 0, each batch takes
    one of the two with probability 0.5. An alpha of 0 is off: with both 0 (a sweep's member
    can have them so) the share is 1 and the images come back as they were, as floats.
    """
    b, h, w = images_BxHxWx1.shape[:3]
    images_BxHxWx1 = images_BxHxWx1.astype(jnp.float32)
    perm_key, which_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 5)
    partner_B = jax.random.permutation(perm_key, b)
    partners_BxHxWx1 = images_BxHxWx1[partner_B]
    mixup_on, cutmix_on = jnp.asarray(mixup_alpha) > 0, jnp.asarray(cutmix_alpha) > 0
    use_cutmix = jnp.where(mixup_on & cutmix_on, jax.random.bernoulli(which_key, 0.5), cutmix_on)

    mixup_share = _beta_or_one(mixup_key, mixup_alpha)
    mixed_BxHxWx1 = mixup_share * images_BxHxWx1 + (1.0 - mixup_share) * partners_BxHxWx1

    cut_ratio = jnp.sqrt(1.0 - _beta_or_one(cutmix_key, cutmix_alpha))
    centre_key_r, centre_key_c = jax.random.split(box_key)
    centre_r = jax.random.randint(centre_key_r, (), 0, h)
    centre_c = jax.random.randint(centre_key_c, (), 0, w)
    half_h = jnp.round(cut_ratio * h).astype(jnp.int32) // 2
    half_w = jnp.round(cut_ratio * w).astype(jnp.int32) // 2
    top, bottom = jnp.clip(centre_r - half_h, 0, h), jnp.clip(centre_r + half_h, 0, h)
    left, right = jnp.clip(centre_c - half_w, 0, w), jnp.clip(centre_c + half_w, 0, w)
    rows_H, cols_W = jnp.arange(h), jnp.arange(w)
    box_HxW = (((rows_H >= top) & (rows_H < bottom))[:, None]
               & ((cols_W >= left) & (cols_W < right))[None, :])
    cut_BxHxWx1 = jnp.where(box_HxW[None, :, :, None], partners_BxHxWx1, images_BxHxWx1)
    cutmix_share = 1.0 - (bottom - top) * (right - left) / (h * w)

    return Mix(images_BxHxWx1=jnp.where(use_cutmix, cut_BxHxWx1, mixed_BxHxWx1),
               partner_B=partner_B,
               share=jnp.where(use_cutmix, cutmix_share, mixup_share).astype(jnp.float32))


def _beta_or_one(key: jax.Array, alpha) -> jax.Array:
    """A draw of Beta(alpha, alpha), or 1 where alpha is 0 (the mixing off)."""
    alpha = jnp.asarray(alpha, jnp.float32)
    on = alpha > 0
    draw = jax.random.beta(key, jnp.where(on, alpha, 1.0), jnp.where(on, alpha, 1.0))
    return jnp.where(on, draw, 1.0)
