"""`scripts/predict.py RUN_DIR FILE...`: the top-k clothing classes of each file, with
probabilities, as text or as one JSON document.

A bad run folder or flag stops everything with one `error:` line (exit 1). A bad input file
is one `error: FILE: ...` line on stderr and does not stop the others: every readable file is
still predicted, and the exit status is 1 at the end, so a script sees that one failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from fmnist_jax.cli import _Parser, user_errors_exit_1
from fmnist_jax.errors import FmnistError

NUM_CLASSES = 10  # as models.NUM_CLASSES; repeated so that --help needs no jax import


def predict_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="predict.py",
        description="Predict the Fashion-MNIST class of images with a trained run folder.",
        epilog="Images: PNG, JPEG, BMP or any picture PIL reads (any size, colour or grey), "
               "or .npy arrays of shape (28, 28), (28, 28, 1), (N, 28, 28) or (N, 28, 28, 1), "
               "uint8 or floats in [0, 1]. Fashion-MNIST garments are light on black: pass "
               "--dark-on-light for photos on a white background.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by scripts/train.py")
    parser.add_argument("files", metavar="FILE", nargs="+", help="image or .npy files")
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help=f"how many classes to show per image, 1..{NUM_CLASSES} (default 3)")
    parser.add_argument("--dark-on-light", action="store_true",
                        help="invert the images (255 - x): for garments darker than their "
                             "background, as in ordinary photos and product shots")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text")
    return parser


@user_errors_exit_1
def predict_main(argv: list[str] | None = None) -> int:
    args = predict_parser().parse_args(argv)
    if not 1 <= args.top_k <= NUM_CLASSES:
        raise FmnistError(f"--top-k must be between 1 and {NUM_CLASSES}, got {args.top_k}")
    import numpy as np  # the heavy imports follow validation, so a bad flag answers at once

    from fmnist_jax.predict import load_images, load_predictor, predict_probs, top_k

    predictor = load_predictor(args.run_dir)  # a bad run folder: one line, exit 1

    loaded: list[tuple[str, np.ndarray]] = []  # (file as given, its images (N, 28, 28, 1))
    errors: list[dict[str, str]] = []
    for file in args.files:
        try:
            loaded.append((file, load_images(file, dark_on_light=args.dark_on_light)))
        except FmnistError as e:  # the message starts with the file's name
            print(f"error: {e}", file=sys.stderr)
            errors.append({"file": file, "error": str(e)})

    results = []
    if loaded:
        probs_NxC = predict_probs(predictor, np.concatenate([images for _, images in loaded]))
        ranked = iter(top_k(probs_NxC, args.top_k))
        for file, images in loaded:
            for index in range(len(images)):
                results.append({"file": file, "index": index, "images_in_file": len(images),
                                "predictions": next(ranked)})

    if args.json:
        _print_json(args, predictor, results, errors)
    else:
        _print_text(args, predictor, results)
    return 1 if errors else 0


def _calibration_words(predictor) -> str:
    if predictor.calibrated:
        return f"calibrated (T={predictor.temperature:.4g})"
    return "uncalibrated (T=1: raw softmax, often overconfident)"


def _print_text(args, predictor, results) -> None:
    print(f"model {predictor.config.model} from {args.run_dir}, {_calibration_words(predictor)}")
    from fmnist_jax.data import CLASS_NAMES

    width = max(len(name) for name in CLASS_NAMES)
    for result in results:
        many = result["images_in_file"] > 1
        print(result["file"] + (f" [{result['index']}]" if many else ""))
        for name, prob in result["predictions"]:
            print(f"  {name:<{width}}  {prob:.4f}")


def _print_json(args, predictor, results, errors) -> None:
    document = {
        "run_dir": str(args.run_dir),
        "model": predictor.config.model,
        "temperature": predictor.temperature,
        "calibrated": predictor.calibrated,
        "dark_on_light": args.dark_on_light,
        "results": [{"file": r["file"], "index": r["index"],
                     "predictions": [{"class": name, "probability": prob}
                                     for name, prob in r["predictions"]]} for r in results],
        "errors": errors,
    }
    print(json.dumps(document, indent=2))
