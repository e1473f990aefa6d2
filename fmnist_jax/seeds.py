"""The many-members twin of `steps`: M models (`--seeds`) stacked on a leading axis and
trained, evaluated and scheduled as one program, in lockstep under `jax.vmap` or one after
another, optionally shared out to groups of devices.

Member m computes what the one-model function of `steps` computes for it, with the same
batches and keys. Array names end in their shape; the letters are listed in `fmnist_jax`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from fmnist_jax.data import Normalization
from fmnist_jax.steps import (StepOptions, Sums, Teacher, TrainState, eval_step, evaluate,
                              padded_batches, plateau_update, scan_epoch, split_over_devices)


def _keep_where(active: jax.Array, new_tree, old_tree):
    """`new_tree` where `active` (a scalar bool) is True, else `old_tree`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old), new_tree, old_tree)


def _zero_sums() -> Sums:
    """The sums of a member that was skipped (`train_epoch_seeds`): nothing counted."""
    return Sums(loss=jnp.float32(0), correct=jnp.int32(0), count=jnp.int32(0))


def over_members(member_fn, shared, member_trees: tuple, active_M: jax.Array,
                  member_sharding: NamedSharding | None, members_at_once: int | None,
                  gather: bool = True):
    """`member_fn(shared, active, *member)` over the leading (member) axis M of every leaf of
    `member_trees` and of `active_M` (False: the member may be skipped);
    `shared` (the images) is the same for all. The members run in lockstep under one
    `jax.vmap` (`members_at_once` None), or that many at a time, one slice after another
    (`jax.lax.map`; 1: each member alone, as a single run computes it).

    With `member_sharding` (`parallel.DataParallel.member_sharding`), the members are shared
    out to the groups of its mesh's seeds axis first, consecutive members per group, under
    `jax.shard_map`: each group computes only its own, in the way above, as a program of its
    own (manual over the seeds axis; a group of several devices splits each batch over them
    as one model's run does). Where the groups do not divide M, spare copies of the last
    member fill the last group's places, never active: one after another they cost nothing,
    and while its last member trains alone a device has the cores to itself. The results
    are gathered whole on every device, where the host reads them; or with `gather` False
    left where their groups computed them: (places, ...) with the spares, split over the
    groups by `member_sharding` (the caller gathers them once every device is done: see
    `gather_members`)."""
    def group_fn(shared, active_G, *group_trees):
        def one_fn(active, *member):
            return member_fn(shared, active, *member)

        # One at a time even for a group of one: only there is a skipped member's branch real.
        lockstep = members_at_once is None or members_at_once >= max(active_G.shape[0], 2)
        if lockstep:
            return jax.vmap(one_fn)(active_G, *group_trees)
        return jax.lax.map(lambda member: one_fn(*member), (active_G, *group_trees),
                           batch_size=None if members_at_once == 1 else members_at_once)

    axis = member_sharding and member_sharding.spec[0]
    if member_sharding is None or member_sharding.mesh.shape[axis] == 1:
        return group_fn(shared, active_M, *member_trees)  # one group: every member everywhere
    mesh = member_sharding.mesh
    m, groups = active_M.shape[0], mesh.shape[axis]
    places = -(-m // groups) * groups
    if places > m:  # spares: the last member again, never active
        last_M = jnp.minimum(jnp.arange(places), m - 1)
        member_trees = jax.tree_util.tree_map(lambda x: x[last_M], member_trees)
        active_M = jnp.concatenate([active_M, jnp.zeros(places - m, bool)])
    # One device per group: manual over the whole mesh, so each device runs exactly the
    # program of a one-device run; else the batch axis stays automatic (split by the
    # members' batch sharding constraints).
    manual = set(mesh.axis_names) if mesh.size == groups else {axis}
    spec = PartitionSpec(axis)
    # check_vma off: a skipped member's zeros are constants, the computed sums vary over
    # the groups, and the two branches of each member's cond must have one type.
    out = jax.shard_map(group_fn, mesh=mesh, in_specs=(PartitionSpec(), spec, *(
        spec for _ in member_trees)), out_specs=spec, axis_names=manual, check_vma=False)(
            shared, active_M, *member_trees)
    return gather_members(out, m, mesh) if gather else out


def gather_members(tree, members: int, mesh: jax.sharding.Mesh):
    """The first `members` of the (places, ...) leaves of `tree`, whole on every device of
    `mesh`: the results of `train_epoch_seeds` or `evaluate_seeds` with `gather=False`.

    Why apart: a device that waits in a collective holds one of the threads that the other
    devices' kernels share out their work to. Gathered inside the epoch's program, a device
    done early would wait there while another trains its last member alone: on a CPU that
    member then runs on one core, where alone it could have had them all (BENCHMARKS.md). Run
    this after the epoch's outputs are ready."""
    out = jax.tree_util.tree_map(lambda x: x[:members], tree)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("batch_size", "options", "batch_sharding",
                                             "member_sharding", "members_at_once", "gather"),
                   donate_argnums=0)
def train_epoch_seeds(state_M: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array,
                      idx_MxQ: jax.Array, key_M: jax.Array, active_M: jax.Array, *,
                      batch_size: int, norm_M: Normalization,
                      options: StepOptions = StepOptions(),
                      batch_sharding: jax.sharding.Sharding | None = None,
                      member_sharding: NamedSharding | None = None,
                      members_at_once: int | None = None,
                      gather: bool = True,
                      teacher_NxC: jax.Array | None = None,
                      teachers: tuple[Teacher, ...] | None = None) -> tuple[TrainState, Sums]:
    """One epoch of M independent models (`--seeds`) as one program: the epoch mapped over
    the members (in lockstep under `jax.vmap`, or one after another: `members_at_once`) and
    their states (every leaf of `state_M` has a leading M axis), their training
    examples `idx_MxQ` (indices into the shared images), their keys `key_M` and
    normalizations `norm_M` (fields of shape (M,)). Member m computes what
    `train_epoch(state_m, images_NxHxWx1[idx_MxQ[m]], labels_N[idx_MxQ[m]], key_M[m])` does,
    with the same batches and keys; in lockstep, the batched matrix products and reductions
    sum in another order, so the results agree within float rounding, not bit for bit (and
    Adam's step, which does not shrink with its gradient, can grow a rounding difference
    in a weight whose gradient is near 0 by orders of magnitude within a few steps).

    A member whose `active_M` is False (stopped early) keeps its state and gets zero sums:
    one member after another, it is not computed at all; in lockstep it is computed with
    the others, then discarded. Returns sums with shape (M,).
    `member_sharding` shares the members out to groups of devices (`parallel.seed_groups`;
    spare places where the groups do not divide M); `batch_sharding` splits each member's
    batches over the devices of its group, as in `train_epoch`; `members_at_once` is how
    many of a group's members run in lockstep (None: all, one vmap; see `over_members` and
    `parallel.members_at_once_for`). `gather` False leaves the results with the groups
    (`gather_members`). `teacher_NxC` or `teachers`, shared by the members: see
    `train_epoch`.
    """
    def member_fn(shared, active, state, idx_Q, key, norm):
        images, labels, teacher, teachers = shared
        # One member after another (`jax.lax.map`) the cond is a real branch: a stopped
        # member (or a spare place) costs nothing. In lockstep, under vmap, it becomes a
        # select: both branches run and the stopped member's new state is thrown away.
        return jax.lax.cond(active, lambda: scan_epoch(state, images, labels, idx_Q, key,
                                                       batch_size, norm, options,
                                                       batch_sharding, teacher, teachers),
                            lambda: (state, _zero_sums()))

    return over_members(member_fn, (images_NxHxWx1, labels_N, teacher_NxC, teachers),
                        (state_M, idx_MxQ, key_M, norm_M), active_M,
                        member_sharding, members_at_once, gather)


@jax.jit
def plateau_update_seeds(state_M: TrainState, val_loss_M: jax.Array,
                         active_M: jax.Array) -> TrainState:
    """`plateau_update` of each member with its own validation loss; stopped members (False
    in `active_M`) keep their schedule's state."""
    def member_fn(state, val_loss, active):
        return _keep_where(active, plateau_update(state, val_loss), state)

    return jax.vmap(member_fn)(state_M, val_loss_M, active_M)


@functools.partial(jax.jit, static_argnames=("batch_size", "batch_sharding", "member_sharding",
                                             "members_at_once", "gather"))
def evaluate_seeds(state_M: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array,
                   idx_MxQ: jax.Array | None, active_M: jax.Array | None = None, *,
                   batch_size: int, norm_M: Normalization,
                   batch_sharding: jax.sharding.Sharding | None = None,
                   member_sharding: NamedSharding | None = None,
                   members_at_once: int | None = None, gather: bool = True) -> Sums:
    """`evaluate` of M members (leading M axis on `state_M`'s leaves and `norm_M`'s fields),
    the images shared: on all N images (`idx_MxQ` None), or member m on the
    examples `idx_MxQ[m]` (its own validation split), batched and padded as `evaluate` would
    batch `images_NxHxWx1[idx_MxQ[m]]`. Returns sums with shape (M,). A member False in
    `active_M` (default: all True) gets zero sums, skipped as `train_epoch_seeds` skips it.
    The members and the batches are shared out to devices, run in lockstep or not, and
    gathered, as in `train_epoch_seeds`."""
    def member_fn(shared, active, state, norm, *idx_Q):
        def compute_fn():
            if idx_MxQ is None:
                return evaluate(state, *shared, batch_size=batch_size, norm=norm,
                                batch_sharding=batch_sharding)
            return _evaluate_member(state, *shared, *idx_Q, batch_size, norm, batch_sharding)

        return jax.lax.cond(active, compute_fn, _zero_sums)  # as in `train_epoch_seeds`

    return over_members(member_fn, (images_NxHxWx1, labels_N),
                         (state_M, norm_M) + (() if idx_MxQ is None else (idx_MxQ,)),
                         jnp.ones(norm_M.mean.shape, bool) if active_M is None else active_M,
                         member_sharding, members_at_once, gather)


def _evaluate_member(state, images_NxHxWx1, labels_N, idx_Q, batch_size, norm,
                     batch_sharding):
    """`evaluate` on the examples `idx_Q` of the images, batched and padded as `evaluate`
    would batch `images_NxHxWx1[idx_Q]`, without copying them."""
    mask_Q = jnp.ones(idx_Q.shape, bool)
    xs = (padded_batches(idx_Q, batch_size), padded_batches(mask_Q, batch_size))
    # The padding indices (0) name a real image; the mask drops it from every sum.
    _, sums_S = jax.lax.scan(lambda c, b: (c, eval_step(
        state, *split_over_devices((images_NxHxWx1[b[0]], labels_N[b[0]], b[1]),
                                    batch_sharding), norm)), None, xs)
    return jax.tree_util.tree_map(jnp.sum, sums_S)
