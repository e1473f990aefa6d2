"""Devices: training over every device of the run, on one host or several.

One code path from one device to many. A `DataParallel` holds a `jax.sharding.Mesh` over the
devices with two axes, "seeds" x "data". The training state and the datasets are replicated
on every device (Fashion-MNIST's 70,000 images are 55 MB as uint8: every device can hold
them); inside the jitted epoch each gathered batch is constrained to `batch_sharding` (split
along the batch axis over "data"), so XLA's SPMD partitioner gives every device its slice of
the batch, and inserts the all-reduce of the gradients and of BatchNorm's batch statistics:
the step computes what one device computes, on the global batch, within float rounding.
With one device the mesh is trivial and every constraint a no-op.

A run of M > 1 seeds (`--seeds`) first splits the devices into groups along "seeds"
(`seed_groups`): each group trains its share of the members as a program of its own
(`jax.shard_map` over "seeds", `member_sharding`), the members needing nothing from each
other, so no step waits for another group; each member's batches are split over the
devices of its group as above. Within a group the members train in lockstep under
`jax.vmap` on a GPU, one after another on a CPU (`members_at_once_for`), where every device
is a group, with spare places, skipped, where the devices do not divide M. On a CPU split
into a device per core (`cpu_devices_for`), the members train in less time than all on one
device (BENCHMARKS.md, `python -m benchmarks.time_seeds`).

Several hosts (or several processes on one host): `initialize_distributed` starts
`jax.distributed` before anything touches a device; then `jax.devices()` lists the devices
of every process, the mesh spans them all, and each process feeds its own devices with
`jax.make_array_from_process_local_data` (each process has loaded the same images, so its
local data is the whole replicated array). Only process 0 writes files (`is_writer`).

The device count is fixed once jax has started its backend: `use_cpu_devices` (the
`--cpu-devices` flag) and `initialize_distributed` must run before the first computation.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmnist_jax.errors import FmnistError
from fmnist_jax.run import peers

DATA_AXIS = "data"
SEEDS_AXIS = "seeds"

# The environment variables read when the distributed flags are not given (the flags win).
COORDINATOR_ENV = "FMNIST_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "FMNIST_NUM_PROCESSES"
PROCESS_ID_ENV = "FMNIST_PROCESS_ID"
CPU_DEVICES_ENV = "FMNIST_CPU_DEVICES"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The mesh of a run ("seeds" x "data"), the shardings its arrays take on it, and how
    many of a group's seeds train in lockstep (`members_at_once`, see
    `members_at_once_for`).

    Hashable (a mesh is), so its fields can be static arguments of a jitted function.
    """

    mesh: Mesh
    members_at_once: int | None = None

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def seed_groups(self) -> int:
        """How many groups of devices the members of a run of several seeds are shared out to
        (1: every member on every device)."""
        return self.mesh.shape[SEEDS_AXIS]

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """Leading (batch) axis split over the devices of the "data" axis, the rest whole;
        None where that axis has one device (nothing to split: each group of seeds then runs
        as a one-device program)."""
        if self.mesh.shape[DATA_AXIS] == 1:
            return None
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def member_sharding(self) -> NamedSharding:
        """Leading (member) axis split over the groups of the "seeds" axis, the rest whole."""
        return NamedSharding(self.mesh, PartitionSpec(SEEDS_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        """A whole copy on every device: the state, the datasets, the keys, the metrics."""
        return NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree):
        """Every array leaf of `tree` (host arrays, or jax arrays on one device) as a global
        array replicated over the mesh; leaves already replicated on it are kept as they are.

        With several processes every process must pass the same values (each loaded the same
        images and built the same state from the same seed).
        """
        return jax.tree_util.tree_map(self._replicate_leaf, tree)

    def _replicate_leaf(self, leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == self.replicated:
            return leaf
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys: their raw bits
            return jax.random.wrap_key_data(self._replicate_leaf(jax.random.key_data(leaf)),
                                            impl=jax.random.key_impl(leaf))
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(leaf))


AUTO = "auto"  # members_at_once: as `members_at_once_for` the devices' platform


def seed_groups(members: int, num_devices: int,
                members_at_once: int | None | str = AUTO) -> int:
    """How many groups of devices `members` models trained together are shared out to.
    Separate groups never wait for each other; the devices within a group split each batch
    and add up their gradients every step.

    One after another (`members_at_once` 1, a CPU's way): every device its own group; where
    the devices do not divide the members, spare places in the last groups are skipped at
    no cost (`seeds.over_members`). In lockstep (a GPU's way) a spare member would be
    computed like the others, so the groups take equal shares of the members and of the
    devices: their greatest common divisor. One model: one group. `members_at_once` by
    default `members_at_once_for` the platform of jax's devices."""
    if members <= 1:
        return 1
    if members_at_once == AUTO:
        members_at_once = members_at_once_for(jax.devices()[0].platform)
    return num_devices if members_at_once == 1 else math.gcd(members, num_devices)


def cpu_devices_for(members: int, cores: int | None = None) -> int:
    """The CPU devices a run of `members` seeds gets when --cpu-devices is not given: one per
    core this process may use, up to one per seed (one for one model)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(cores, members))


def members_at_once_for(platform: str) -> int | None:
    """How many of a group's seeds train in lockstep, under one `jax.vmap`, on `platform`:
    all (None) where one small model leaves the device idle (a GPU); one on a CPU, where K
    members in lockstep hold K times one model's activations, which fall out of the caches,
    and the members one after another (`jax.lax.map`) train faster (BENCHMARKS.md,
    `python -m benchmarks.time_seeds`)."""
    return 1 if platform == "cpu" else None


def data_parallel(devices=None, *, members: int = 1,
                  members_at_once: int | None | str = AUTO) -> DataParallel:
    """A mesh over `devices` (default: every device of every process, `jax.devices()`), in
    `seed_groups(members, ...)` groups along "seeds" (each of consecutive devices: one
    process's, where it can) and the rest along "data"; `members_at_once` by default
    `members_at_once_for` the devices' platform."""
    devices = jax.devices() if devices is None else list(devices)
    if members_at_once == AUTO:
        members_at_once = members_at_once_for(devices[0].platform)
    groups = seed_groups(members, len(devices), members_at_once)
    return DataParallel(Mesh(np.array(devices).reshape(groups, -1), (SEEDS_AXIS, DATA_AXIS)),
                        members_at_once)


def check_batch_sizes(batch_size: int, eval_batch_size: int, num_devices: int,
                      members: int = 1, members_at_once: int | None | str = AUTO) -> None:
    """FmnistError unless both batch sizes split evenly over the devices that share each
    batch: all `num_devices`, or with `members` > 1 seeds the devices of one group
    (`seed_groups`)."""
    per_batch = num_devices // seed_groups(members, num_devices, members_at_once)
    where = (f"the {per_batch} devices" if per_batch == num_devices else
             f"the {per_batch} devices of each group of seeds ({num_devices} devices in "
             f"{num_devices // per_batch} groups)")
    for flag, size in (("--batch-size", batch_size), ("--eval-batch-size", eval_batch_size)):
        if size % per_batch:
            raise FmnistError(
                f"{flag} {size} does not split over {where}: each device takes an equal "
                f"share of every batch, so pass a multiple of {per_batch} "
                f"(e.g. {flag} {max(per_batch, size // per_batch * per_batch)})")


def is_writer() -> bool:
    """Whether this process writes the run folder and the logs: process 0 (the only one on a
    single host)."""
    return jax.process_index() == 0


def process_0_agrees(ok: bool) -> bool:
    """Process 0's `ok`, on every process (a collective: all processes must call it). Lets
    the others stop with one line when process 0 refused something only it checks (its run
    folder), instead of waiting for it in the first collective until jax's heartbeat
    timeout ends them."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def describe_devices(members: int = 1) -> str:
    """One line naming the devices and how a run of `members` models shares them, e.g. "cpu
    (cpu)", "4 x gpu (NVIDIA H100), data parallel over 2 processes" or "2 x cpu (cpu), the
    seeds in 2 groups of 1 device, up to 2 seeds each"."""
    devices = jax.devices()
    what = f"{devices[0].platform} ({devices[0].device_kind})"
    groups = seed_groups(members, len(devices))
    if len(devices) > 1:
        per_group = len(devices) // groups
        seeds_each = -(-members // groups)
        what = f"{len(devices)} x {what}, " + (
            "data parallel" if groups == 1 else
            f"the seeds in {groups} groups of {per_group} device{'s' * (per_group > 1)}"
            + (", data parallel within each" if per_group > 1 else "")
            + f", {'up to ' * (members % groups > 0)}{seeds_each} "
              f"seed{'s' * (seeds_each > 1)} each")
    if jax.process_count() > 1:
        what += f"{',' * (groups > 1)} over {jax.process_count()} processes"
    return what


# ---------------------------------------------------------------------------------------
# Start-up: before jax starts its backend


def _int_or_error(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FmnistError(f"{what} must be an integer, got {text!r}") from None


def max_cpu_devices() -> int:
    """The most CPU devices `use_cpu_devices` sets up: 256, or one per core where there are
    more. Devices beyond the cores only emulate a mesh (the tests, benchmarks/), each batch
    must split over all of them, and jax builds every one as it starts, before any check of
    ours can run (100,000 took 4 GB)."""
    return max(256, os.cpu_count() or 1)


def use_cpu_devices(count: int | str | None, *, default: int | None = None) -> None:
    """Split the CPU into `count` XLA devices (default ${FMNIST_CPU_DEVICES}, else `default`;
    none: jax's default, one). Only the CPU backend is affected: on a GPU machine the GPUs
    stay the devices. Must run before jax starts its backend."""
    flag = "--cpu-devices" if count is not None else f"${CPU_DEVICES_ENV}"
    if count is None:
        count = os.environ.get(CPU_DEVICES_ENV)
        if not count:
            if default is None or default == 1:
                return
            try:
                jax.config.update("jax_num_cpu_devices", default)
            except RuntimeError:  # jax already runs (a caller's own process): keep its devices
                pass
            return
        count = _int_or_error(count, CPU_DEVICES_ENV)
    if isinstance(count, str):
        count = _int_or_error(count, "--cpu-devices")
    if count < 1:
        raise FmnistError(f"--cpu-devices must be at least 1, got {count}")
    if count > max_cpu_devices():
        cores = len(os.sched_getaffinity(0))  # the cores this process may use
        raise FmnistError(f"{flag} {count} is more than {max_cpu_devices()}, the most the CPU "
                          f"is split into (devices beyond its {cores} cores only emulate a "
                          f"mesh, and each takes memory as jax starts): pass at most "
                          f"{max_cpu_devices()} ({cores}, one per core, trains fastest)")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # jax refuses once its backend runs
        raise FmnistError(f"--cpu-devices {count} came too late: jax has already started "
                          f"its devices ({e})") from e


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process stands among the processes of one run (see `initialize_distributed`)."""

    coordinator_address: str | None
    num_processes: int
    process_id: int
    connect_timeout: int = peers.DEFAULT_CONNECT_TIMEOUT_S


def distributed_settings(coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None,
                         connect_timeout: int | None = None) -> Distributed:
    """The distributed settings from the flags, else from $FMNIST_COORDINATOR_ADDRESS,
    $FMNIST_NUM_PROCESSES and $FMNIST_PROCESS_ID; one process when none is given. Checked
    here, cheaply, before anything starts (the coordinator's address: HOST:PORT, a host that
    resolves, `peers.check_address`)."""
    env = os.environ
    address = coordinator_address or env.get(COORDINATOR_ENV) or None
    if num_processes is None and env.get(NUM_PROCESSES_ENV):
        num_processes = _int_or_error(env[NUM_PROCESSES_ENV], NUM_PROCESSES_ENV)
    if process_id is None and env.get(PROCESS_ID_ENV):
        process_id = _int_or_error(env[PROCESS_ID_ENV], PROCESS_ID_ENV)
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            alone = ("without --num-processes" if num_processes is None else
                     "with --num-processes 1, whose one process is 0")
            raise FmnistError(f"--process-id {process_id} {alone}: pass the number of "
                              f"processes (more than {process_id}), or drop --process-id")
        return Distributed(address, 1, 0)
    if num_processes < 1:
        raise FmnistError(f"--num-processes must be at least 1, got {num_processes}")
    if not address:
        raise FmnistError(f"--num-processes {num_processes} needs --coordinator-address "
                          f"HOST:PORT (process 0's host, the same for every process)")
    if process_id is None:
        raise FmnistError(f"--num-processes {num_processes} needs --process-id, this process's "
                          f"number in [0, {num_processes}) (0 for the one at "
                          f"--coordinator-address)")
    if not 0 <= process_id < num_processes:
        raise FmnistError(f"--process-id must be in [0, {num_processes}) for "
                          f"--num-processes {num_processes}, got {process_id}")
    if connect_timeout is None:
        connect_timeout = peers.DEFAULT_CONNECT_TIMEOUT_S
    if connect_timeout < 1:
        raise FmnistError(f"--connect-timeout must be at least 1 (seconds), got "
                          f"{connect_timeout}")
    peers.check_address(address, "--coordinator-address" if coordinator_address
                        else f"${COORDINATOR_ENV}")
    return Distributed(address, num_processes, process_id, connect_timeout)


def initialize_distributed(settings: Distributed) -> None:
    """Join the run's other processes through `jax.distributed` (nothing with one process),
    waiting up to `settings.connect_timeout` seconds for them (`peers.join`; then a watch
    on them ends this process with one line if one stops). Must run before jax starts its
    backend; every process of the run calls it, and each blocks until all have joined."""
    if settings.num_processes == 1:
        return
    # CPU devices of several processes talk through gloo (the GPU and TPU backends bring
    # their own collectives and ignore this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        peers.join(settings.coordinator_address, settings.num_processes, settings.process_id,
                   settings.connect_timeout)
    except RuntimeError as e:
        raise FmnistError(f"process {settings.process_id} of {settings.num_processes} could "
                          f"not join the coordinator at {settings.coordinator_address} "
                          f"({str(e).splitlines()[0][:200]}): start every process with the "
                          f"same --coordinator-address, one of them with --process-id 0") from e
