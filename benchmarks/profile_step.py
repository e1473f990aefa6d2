"""Per-image cost of one LeNet-5 training step, JAX vs torch-tensors PyTorch, and where JAX's goes.

    python -m benchmarks.profile_step                  # both parts
    python -m benchmarks.profile_step --no-breakdown --rounds 9
    python -m benchmarks.profile_step --impl im2col    # im2col in both layers
    python -m benchmarks.profile_step --compare-3d-rows   # also the conv on 3-D rows
    python -m benchmarks.profile_step --cnn-formulations  # the tutorial CNN's choice
    python -m benchmarks.profile_step --layer-formulations  # one conv layer, each form

Part 1 (benchmarks.profiling.step_costs): per batch size, a scan of K train steps
(steps.train_epoch on random uint8 images, compile excluded) and torch_train.train_epoch_tensors
on the same number of images, interleaved round by round in this process; medians of
microseconds per image and their ratio JAX/torch. On a shared machine only the ratio means
much. Part 2 (benchmarks.profiling.op_breakdown): a jax.profiler trace of one scan, summed
per XLA thunk, labelled with the layer each came from.
"""

import argparse

from fmnist_jax import conv_forms, layers, models
from benchmarks.profiling import cnn_formulations, layer_formulations, op_breakdown, step_costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--images", type=int, default=8192, help="images per timed run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impl", choices=sorted(conv_forms.CONV_IMPLS),
                    help="force this conv formulation (default: the backend's choice)")
    ap.add_argument("--compare-im2col", action="store_true",
                    help="also time LeNet-5 with the im2col conv and jnp's max pool")
    ap.add_argument("--compare-3d-rows", action="store_true",
                    help="also time LeNet-5 with the Toeplitz conv on 3-D rows (B, Ho, L) "
                         "and the NHWC select pool")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--breakdown-batch", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cnn-formulations", action="store_true",
                    help="only time the tutorial CNN with each per-layer conv formulation")
    ap.add_argument("--layer-formulations", action="store_true",
                    help="only time one conv layer (forward and backward) per formulation, "
                         "for a grid of shapes (benchmarks.profiling.LAYER_SHAPES)")
    a = ap.parse_args()
    if a.layer_formulations:
        layer_formulations(rounds=a.rounds)
        return
    if a.cnn_formulations:
        cnn_formulations(rounds=a.rounds)
        return
    if a.impl:
        layers.conv_and_pool_impl = lambda backend=None, kernel_shape=None, _i=a.impl, **_: (
            _i, "select")
    lenet = models.LeNet5()
    jax_models = {"jax": lenet}
    if a.compare_im2col:
        from benchmarks.profiling import im2col_lenet5
        jax_models["jax-im2col-jnp-pool"] = im2col_lenet5()
    if a.compare_3d_rows:
        from benchmarks.profiling import toeplitz_3d_rows_lenet5
        jax_models["jax-toeplitz-3d-rows"] = toeplitz_3d_rows_lenet5()
    step_costs(jax_models, [int(b) for b in a.batch_sizes.split(",")],
               images_per_run=a.images, rounds=a.rounds, torch=not a.no_torch)
    if not a.no_breakdown:
        for label, model in jax_models.items():
            total, rows = op_breakdown(model, a.breakdown_batch)
            print(f"\n{label}: per-op breakdown, batch {a.breakdown_batch}: sum of XLA thunks "
                  f"{total:.0f} us/step = {total / a.breakdown_batch:.1f} us/img")
            for us, name, shape, op in rows[: a.top]:
                print(f"  {us:8.0f} us {100 * us / total:5.1f}%  {name:26s} {shape:22s} {op[:64]}")


if __name__ == "__main__":
    main()
