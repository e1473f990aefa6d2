"""Epoch time with each batch split over 1 vs 2 (or more) devices, interleaved in one process.

    python -m benchmarks.time_device_split --cpu-devices 2                  # lenet5, batch 64 and 256
    python -m benchmarks.time_device_split --cpu-devices 4 --devices 1,2,4 --rounds 5

Trains the preset (default lenet5) on its training images less the validation split, without
evaluation; see benchmarks.device_split. Prints one line per epoch (with the load average),
then a markdown table.
"""

import os

from fmnist_jax.cli_flags import Parser, start_devices, use_compile_cache, user_errors_exit_1
from fmnist_jax.errors import FmnistError


@user_errors_exit_1
def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="lenet5")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--devices", default="1,2", help="device counts to compare; the first is "
                                                     "the baseline of the ratio")
    ap.add_argument("--rounds", type=int, default=3, help="epochs per config")
    ap.add_argument("--cpu-devices", type=int, help="split the CPU into N XLA devices first")
    ap.add_argument("--data-dir")
    ap.add_argument("--manual-dir")
    args = ap.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device_counts = [int(d) for d in args.devices.split(",")]
    use_compile_cache(None)
    start_devices(args)
    import jax

    from fmnist_jax import data
    from fmnist_jax.run.presets import get_config
    from benchmarks.device_split import markdown_table, time_device_split

    if max(device_counts) > jax.device_count():
        raise FmnistError(f"--devices {args.devices} asks for {max(device_counts)} devices and "
                          f"this process has {jax.device_count()}: pass --cpu-devices "
                          f"{max(device_counts)}")
    from fmnist_jax.run.parallel import check_batch_sizes

    for batch_size in batch_sizes:  # before the data loads
        for count in device_counts:
            check_batch_sizes(batch_size, batch_size, count)
    cfg = get_config(args.preset)
    train, _ = data.load(data_dir=args.data_dir, manual_dir=args.manual_dir)
    train, _ = data.split_train_val(train, cfg.val_fraction, cfg.split_seed)
    print(f"{len(train)} images, {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, load {os.getloadavg()}", flush=True)
    rows = time_device_split(cfg, train, batch_sizes=batch_sizes, device_counts=device_counts,
                             rounds=args.rounds, log_fn=lambda s: print(s, flush=True))
    print(f"load at the end {os.getloadavg()}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    main()
