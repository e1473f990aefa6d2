"""Devices: data parallel training over every device of the run, on one host or several.

One code path from one device to many. A `DataParallel` holds a `jax.sharding.Mesh` over the
devices with one axis, "data". The training state and the datasets are replicated on every
device (Fashion-MNIST's 70,000 images are 55 MB as uint8: every device can hold them);
inside the jitted epoch each gathered batch is constrained to `batch_sharding` (split along
the batch axis), so XLA's SPMD partitioner gives every device its slice of the batch, and
inserts the all-reduce of the gradients and of BatchNorm's batch statistics: the step
computes what one device computes, on the global batch, within float rounding. With one
device the mesh is trivial and every constraint a no-op.

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
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmnist_jax.errors import FmnistError

DATA_AXIS = "data"

# The environment variables read when the distributed flags are not given (the flags win).
COORDINATOR_ENV = "FMNIST_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "FMNIST_NUM_PROCESSES"
PROCESS_ID_ENV = "FMNIST_PROCESS_ID"
CPU_DEVICES_ENV = "FMNIST_CPU_DEVICES"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The mesh of a run, and the two shardings its arrays take on it.

    Hashable (a mesh is), so `batch_sharding` can be a static argument of a jitted function.
    """

    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) axis split over the devices, the rest whole."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

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


def data_parallel(devices=None) -> DataParallel:
    """A mesh over `devices` (default: every device of every process, `jax.devices()`)."""
    devices = jax.devices() if devices is None else list(devices)
    return DataParallel(Mesh(np.array(devices), (DATA_AXIS,)))


def check_batch_sizes(batch_size: int, eval_batch_size: int, num_devices: int) -> None:
    """FmnistError unless both batch sizes split evenly over `num_devices` devices."""
    for flag, size in (("--batch-size", batch_size), ("--eval-batch-size", eval_batch_size)):
        if size % num_devices:
            raise FmnistError(
                f"{flag} {size} does not split over the {num_devices} devices: each device "
                f"takes an equal share of every batch, so pass a multiple of {num_devices} "
                f"(e.g. {flag} {max(num_devices, size // num_devices * num_devices)})")


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


def describe_devices() -> str:
    """One line naming the devices, e.g. "cpu (cpu)" or "4 x gpu (NVIDIA H100) over 2
    processes"."""
    devices = jax.devices()
    what = f"{devices[0].platform} ({devices[0].device_kind})"
    if len(devices) > 1:
        what = f"{len(devices)} x {what}, data parallel"
    if jax.process_count() > 1:
        what += f" over {jax.process_count()} processes"
    return what


# ---------------------------------------------------------------------------------------
# Start-up: before jax starts its backend


def _int_or_error(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FmnistError(f"{what} must be an integer, got {text!r}") from None


def use_cpu_devices(count: int | str | None) -> None:
    """Split the CPU into `count` XLA devices (default ${FMNIST_CPU_DEVICES}; none: jax's
    default, one). Only the CPU backend is affected: on a GPU machine the GPUs stay the
    devices. Must run before jax starts its backend."""
    if count is None:
        count = os.environ.get(CPU_DEVICES_ENV)
        if not count:
            return
        count = _int_or_error(count, CPU_DEVICES_ENV)
    if isinstance(count, str):
        count = _int_or_error(count, "--cpu-devices")
    if count < 1:
        raise FmnistError(f"--cpu-devices must be at least 1, got {count}")
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


def distributed_settings(coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None) -> Distributed:
    """The distributed settings from the flags, else from $FMNIST_COORDINATOR_ADDRESS,
    $FMNIST_NUM_PROCESSES and $FMNIST_PROCESS_ID; one process when none is given. Checked
    here, cheaply, before anything starts."""
    env = os.environ
    address = coordinator_address or env.get(COORDINATOR_ENV) or None
    if num_processes is None and env.get(NUM_PROCESSES_ENV):
        num_processes = _int_or_error(env[NUM_PROCESSES_ENV], NUM_PROCESSES_ENV)
    if process_id is None and env.get(PROCESS_ID_ENV):
        process_id = _int_or_error(env[PROCESS_ID_ENV], PROCESS_ID_ENV)
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise FmnistError(f"--process-id {process_id} without --num-processes: pass the "
                              f"number of processes too")
        return Distributed(address, 1, 0)
    if num_processes < 1:
        raise FmnistError(f"--num-processes must be at least 1, got {num_processes}")
    if not address:
        raise FmnistError(f"--num-processes {num_processes} needs --coordinator-address "
                          f"HOST:PORT (process 0's host, the same for every process)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise FmnistError(f"--process-id must be in [0, {num_processes}) for "
                          f"--num-processes {num_processes}, got {process_id}")
    return Distributed(address, num_processes, process_id)


def initialize_distributed(settings: Distributed) -> None:
    """Join the run's other processes through `jax.distributed` (nothing with one process).
    Must run before jax starts its backend; every process of the run calls it, and each
    blocks until all have joined."""
    if settings.num_processes == 1:
        return
    # CPU devices of several processes talk through gloo (the GPU and TPU backends bring
    # their own collectives and ignore this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                                   settings.process_id)
    except RuntimeError as e:
        raise FmnistError(f"process {settings.process_id} of {settings.num_processes} could "
                          f"not join the coordinator at {settings.coordinator_address} "
                          f"({str(e).splitlines()[0][:200]}): start every process with the "
                          f"same --coordinator-address, one of them with --process-id 0") from e
