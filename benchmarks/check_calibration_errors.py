"""Each calibration error of `fmnist_jax.metrics` on a finished run's real test logits, against
the independent float64 numpy references of tests/test_calibration_errors.py and relplot:
`python -m benchmarks.check_calibration_errors --runs RUN [RUN ...] [--data-dir DIR]` prints
a markdown table of the largest absolute difference per error, before and after the run's
calibration map (relplot only where it is installed)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, metrics
from fmnist_jax.evaluation.calibration import apply_calibration
from fmnist_jax.evaluation.report import load_run
from fmnist_jax.models import get_model
from fmnist_jax.run import results
from fmnist_jax.steps import inference_state, predict_logits
from tests import test_calibration_errors as ref


def differences(probs_NxC: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    probs, labels = jnp.asarray(probs_NxC), jnp.asarray(labels_N)
    smooth, sigma = metrics.smooth_ece(probs, labels)
    sweep, _ = metrics.ece_sweep(probs, labels)
    out = {
        "equal-mass ECE": abs(float(metrics.equal_mass_ece(probs, labels))
                              - ref.ref_equal_mass_ece(probs_NxC, labels_N)),
        "ECE_sweep": abs(float(sweep) - ref.ref_ece_sweep(probs_NxC, labels_N)[0]),
        "debiased l2-CE": abs(float(metrics.debiased_l2_ce(probs, labels))
                              - ref.ref_debiased_l2(probs_NxC, labels_N)),
        "classwise ECE": abs(float(metrics.classwise_ece(probs, labels))
                             - ref.ref_classwise_ece(probs_NxC, labels_N)),
        "SmoothECE": abs(float(smooth) - ref.ref_smooth_ece(probs_NxC, labels_N)[0]),
    }
    try:
        import relplot
    except ImportError:
        return out
    f, y = ref._top1(probs_NxC, labels_N)
    out["SmoothECE vs relplot"] = abs(float(smooth) - relplot.smECE(f, y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    _, test = data.load(data_dir=args.data_dir)
    rows = {}
    for run_dir in args.runs:
        run = load_run(run_dir)
        logits_NxC = predict_logits(inference_state(get_model(run.config.model), run.variables),
                                    jnp.asarray(test.images_NxHxWx1), batch_size=1000,
                                    norm=run.normalization)
        cal_map = results.load_calibration(run_dir) or {"kind": "temperature", "temperature": 1.0}
        for side, mapped in (("before", logits_NxC),
                             (f"after {cal_map['kind']}", apply_calibration(cal_map, logits_NxC))):
            probs = np.asarray(jax.nn.softmax(mapped))
            rows[f"{run_dir} {side}"] = differences(probs, np.asarray(test.labels_N))
    names = list(next(iter(rows.values())))
    print("| logits | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:.1e}" for n in names) + " |")


if __name__ == "__main__":
    main()
