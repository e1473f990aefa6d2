"""One prepared check of a GPU machine, within a time budget, results in two files:

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR --manual-dir data/fashion_mnist
    python -m benchmarks.gpu_check --out DIR --smoke      # tiny sizes, a few minutes on a CPU

Writes DIR/gpu_check.json and DIR/gpu_check.md, both rewritten after every part, so a killed
run still leaves what it measured. Parts, in order: the environment; a subset of the tests
(pytest, counted from its junit XML); every conv and pool formulation per layer and per model
(the measurement behind `layers.conv_and_pool_impl`); the bench against PyTorch (lenet5);
a whole `scripts/train.py` run split into start-up, compile, epochs and evaluation, its
checkpoint restored on the CPU and the GPU in other processes; the same seed trained at the
highest matmul precision and on the CPU; `--seeds K` epoch time; the bench of the cnn preset.

Each part has a share of `--budget-s` (unused time passes to the next part) and runs in a
process of its own, stopped at its deadline (Ctrl-C, then a kill): what it saved is kept,
marked "partial: out of time", and a part that cannot start in time is "skipped: out of
time". Without a GPU the check still runs (on the CPU, at small sizes where that makes
sense) and marks the parts and comparisons that need one "skipped: no GPU". More in
docs/gpu_check.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_report import markdown

REPO = Path(__file__).resolve().parents[1]
JSON_FILE, MD_FILE = "gpu_check.json", "gpu_check.md"
NO_GPU = "skipped: no GPU"
OUT_OF_TIME = "skipped: out of time"  # no time left to start the part
STOPPED = "out of time: stopped, nothing saved"  # started, stopped before its first result
PARTIAL = "partial: out of time"  # started, stopped; what it saved is kept
# The part names in order, with their shares of the budget (sum 1).
SHARES = {"environment": 30, "tests": 75, "conv_formulations": 55, "bench_lenet5": 140,
          "train_run": 50, "precision": 55, "seeds": 40, "bench_cnn": 35}
# The tests that matter on a GPU: steps, every conv formulation against nn.Conv (slow ones
# included), models, --seeds, data parallel, checkpoints, the device choice.
TEST_FILES = ["tests/test_layers.py", "tests/test_steps.py", "tests/test_models.py",
              "tests/test_seeds.py", "tests/test_parallel.py", "tests/test_checkpoints.py",
              "tests/test_device_choice.py"]
TEST_SELECTION = "test_layers or not slow"  # -k: markers are keywords too
SMOKE_TESTS = ["tests/test_layers.py::test_backend_choice_is_made_in_one_place",
               "tests/test_steps.py::test_normalization_maps_pixels_to_minus_one_one"]
MANUAL_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class Check:
    def __init__(self, out: Path, manual_dir: Path, *, smoke: bool, budget_s: float):
        self.out, self.manual_dir, self.smoke = out, manual_dir, smoke
        self.started = time.time()
        self.deadline = self.started + budget_s
        self.grace = 5 if smoke else 20
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.gpu = False
        self.slack = 0.0
        self.budget_s = budget_s
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "FMNIST_MANUAL_DIR": str(manual_dir), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if smoke:  # LLVM's optimizations off: the smoke run times nothing (CPU-only flag)
            self.env["XLA_FLAGS"] = " ".join(filter(None, [
                os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
        self.results = {"mode": "smoke" if smoke else "full", "budget_s": budget_s,
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "command": " ".join(sys.argv), "gpu": None, "parts": {}}

    # ------------------------------------------------------------------ bookkeeping

    def write(self) -> None:
        from fmnist_jax.files import write_atomically

        self.results["wall_s"] = round(time.time() - self.started, 1)
        write_atomically(self.out / JSON_FILE, json.dumps(self.results, indent=1, default=str))
        write_atomically(self.out / MD_FILE, markdown(self.results))

    def part(self, name: str, fn) -> None:
        allotted = SHARES[name] / sum(SHARES.values()) * self.budget_s + self.slack
        left = self.deadline - time.time()
        t0 = time.time()
        if left < (2 if self.smoke else 10):
            entry = {"status": OUT_OF_TIME}
        else:
            part_deadline = t0 + min(allotted, left)
            try:
                entry = fn(part_deadline)
            except Exception as e:  # one broken part must not cost the others
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        entry["seconds"] = round(time.time() - t0, 1)
        self.slack = max(0.0, allotted - (time.time() - t0))
        self.results["parts"][name] = entry
        self.write()

    def run(self, command: list[str], deadline: float, *, env: dict | None = None,
            marks: tuple[str, ...] = ()) -> dict:
        """`command` in a session of its own, stopped (with its children) past `deadline`:
        first Ctrl-C, a quarter of `grace` past it, so that pytest still writes its junit XML
        and a part its last result (once XLA returns from a compile, which Ctrl-C does not
        cut short), then `grace` past it a kill. Returns rc (None: killed), timed_out,
        seconds, the output tails and, for each prefix in `marks`, the seconds at which the
        first stdout line starting with it came."""
        t0 = time.perf_counter()
        # A command started in the background (nohup, `cmd &`) ignores SIGINT, which its
        # children inherit, and a Python started so raises no KeyboardInterrupt. A handled
        # signal is reset to its default by exec: handle it here, and the child gets Ctrl-C.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        process = subprocess.Popen(command, cwd=REPO, env={**self.env, **(env or {})},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        out, err, seen = [], [], {}

        def read(stream, lines, timed):
            for line in stream:
                lines.append(line)
                for mark in marks if timed else ():
                    if line.startswith(mark) and mark not in seen:
                        seen[mark] = round(time.perf_counter() - t0, 2)
        readers = [threading.Thread(target=read, args=(process.stdout, out, True)),
                   threading.Thread(target=read, args=(process.stderr, err, False))]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            rc = process.wait(timeout=max(1.0, deadline + self.grace / 4 - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGINT)  # the session this call started
            try:
                rc = process.wait(timeout=max(1.0, deadline + self.grace - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                rc = None
        for reader in readers:
            reader.join()
        return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 2),
                "marks": seen,
                "first_line": out[0].rstrip() if out else None,
                "stdout_tail": "".join(out)[-1500:], "stderr_tail": "".join(err)[-1500:]}

    def child(self, part: str, opts: dict, deadline: float, *, env: dict | None = None,
              tag: str = "") -> dict:
        """A part of benchmarks.gpu_parts in its own process: {"status", "result", ...}."""
        result_file = self.work / f"{part}{tag}.json"
        opts = {"smoke": self.smoke, "gpu": self.gpu, "manual_dir": str(self.manual_dir),
                **opts}
        ran = self.run([sys.executable, "-m", "benchmarks.gpu_parts", part, "--result",
                        str(result_file), "--deadline", str(deadline), "--opts",
                        json.dumps(opts)], deadline, env=env)
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if ran["rc"] == 0:
            return {"status": "ok", "result": result, "seconds": ran["seconds"]}
        status = (PARTIAL if result else STOPPED) if ran["timed_out"] else "failed"
        return {"status": status, "result": result, "seconds": ran["seconds"],
                "stderr_tail": None if ran["timed_out"] else ran["stderr_tail"]}

    # ------------------------------------------------------------------------ parts

    def environment(self, deadline: float) -> dict:
        if self.smoke:
            _tiny_csv(self.manual_dir, self.work / "tiny")
        entry = self.child("environment", {}, deadline)
        info = entry.get("result") or {}
        self.gpu = info.get("jax_backend") == "gpu"
        self.results["gpu"] = self.gpu
        if shutil.which("nvidia-smi"):
            smi = self.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], time.time() + 20)
            info["nvidia_smi"] = smi["stdout_tail"].strip() or smi["stderr_tail"].strip()
        else:
            info["nvidia_smi"] = "not found (device attributes from jax above)"
        info["cpu_count"] = os.cpu_count()
        return {**entry, "result": info}

    def tests(self, deadline: float) -> dict:
        junit = self.work / "junit.xml"
        workers = (["-n", str(min(8, (os.cpu_count() or 1) // 2))]
                   if importlib.util.find_spec("xdist") and (os.cpu_count() or 1) >= 8
                   and not self.smoke else (["-p", "no:xdist"] if importlib.util.find_spec(
                       "xdist") else []))
        selection = SMOKE_TESTS if self.smoke else [*TEST_FILES, "-k", TEST_SELECTION]
        command = [sys.executable, "-m", "pytest", *selection, "-q", "-rA", "-p",
                   "no:cacheprovider", f"--junitxml={junit}", *workers]
        # The tests' tolerances are float32's; XLA runs float32 matmuls and convolutions in
        # TF32 on this GPU by default, which fails them without any bug
        # (https://github.com/jax-ml/jax/issues/12008). The precision part measures TF32.
        env = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
        ran = self.run(command, deadline, env=env)
        entry = {"command": "python -m pytest " + " ".join(command[3:]).replace(
            str(junit), "JUNIT.xml"), "env": env, "rc": ran["rc"]}
        if junit.exists():  # also when stopped at the deadline: Ctrl-C still writes it
            entry.update(_junit_counts(junit))
            entry["status"] = ("ok" if ran["rc"] == 0 else PARTIAL if ran["timed_out"]
                               else "failed")
        else:
            entry.update(status=STOPPED if ran["timed_out"] else "failed",
                         output_tail=ran["stdout_tail"][-800:],
                         stderr_tail=ran["stderr_tail"][-800:])
        return entry

    def conv_formulations(self, deadline: float) -> dict:
        entry = self.child("conv_formulations", {}, deadline)
        if not self.gpu:
            entry["note"] = f"measured on the CPU; the GPU's choice: {NO_GPU}"
        return entry

    def bench(self, preset: str, deadline: float) -> dict:
        if self.smoke:
            sizes = {"epochs": 1, "num_seeds": 1, "train_images": 512}
        elif self.gpu:
            sizes = ({"epochs": 10, "num_seeds": 3} if preset == "lenet5" else
                     {"epochs": 3, "num_seeds": 2})
        else:
            sizes = {"epochs": 2, "num_seeds": 1, "train_images": 8192 if preset == "lenet5"
                     else 4096}
        pipelines = (["jax", "torch-tensors", "torch-dataloader"]
                     if preset == "lenet5" and not self.smoke else ["jax", "torch-tensors"])
        entry = self.child("bench", {"preset": preset, "pipelines": pipelines, **sizes},
                           deadline, tag=f"_{preset}")
        entry["asked"] = {"preset": preset, "pipelines": pipelines, **sizes}
        notes = []
        if not self.gpu:
            notes.append(f"torch-CUDA pipelines: {NO_GPU} (ran on the CPU at small size)")
        if importlib.util.find_spec("torch") is None:
            notes.append("torch pipelines: skipped: torch is not installed")
        entry["note"] = "; ".join(notes) or None
        return entry

    def train_run(self, deadline: float) -> dict:
        """scripts/train.py as a user runs it, timed from outside; then its checkpoint read
        back on the default device and on the CPU, each in a process of its own. The run
        gets 70% of the time: its report, the slow end, must not cost the restores."""
        report = not self.smoke
        train_deadline = (time.time() + 0.7 * (deadline - time.time())) if report else deadline
        a = self._train("default", {}, train_deadline, report=report)
        entry = {"status": a["status"], "train": a}
        if not (Path(a["run_dir"]) / "best.json").exists():  # no model kept: nothing to restore
            return entry
        restored = {}
        for where, env in (("default", {}), ("cpu", {"JAX_PLATFORMS": "cpu"})):
            restored[where] = self.child("restore", {
                "run_dir": a["run_dir"], "arrays_out": str(self.work / f"arrays_{where}.npz"),
                "test_csv": str(self.work / "tiny" / "test.csv") if self.smoke else None},
                deadline, env=env, tag=f"_{where}")
        entry["restore"] = restored
        if all(r["status"] == "ok" for r in restored.values()):
            import numpy as np

            first, second = (np.load(self.work / f"arrays_{w}.npz") for w in ("default", "cpu"))
            entry["checkpoint"] = {
                "same_sha256": restored["default"]["result"]["sha256"]
                == restored["cpu"]["result"]["sha256"],
                "arrays_equal": sorted(first.files) == sorted(second.files) and all(
                    np.array_equal(first[k], second[k]) for k in first.files),
                "written_on": a.get("device"),
                "test_accuracy": {w: r["result"]["test_accuracy"] for w, r in restored.items()},
                "note": None if self.gpu else
                f"written and read on the CPU (GPU to CPU: {NO_GPU}): checks the mechanics"}
        else:
            entry["status"] = "failed" if any(r["status"] == "failed"
                                              for r in restored.values()) else PARTIAL
        return entry

    def precision(self, deadline: float) -> dict:
        if not self.gpu:
            return {"status": NO_GPU, "note": "GPU (TF32 and highest) against CPU accuracy"}
        entry = {"status": "ok", "runs": {}}
        for name, env, flags in (("gpu_highest", {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}, []),
                                 ("cpu", {}, ["--device", "cpu"])):
            if time.time() > deadline - 10:
                entry["runs"][name] = {"status": OUT_OF_TIME}
                continue
            entry["runs"][name] = self._train(name, env, deadline, report=False, flags=flags)
        statuses = [r["status"] for r in entry["runs"].values()]
        if any(s != "ok" for s in statuses):
            entry["status"] = "failed" if "failed" in statuses else PARTIAL
        entry["note"] = ("XLA runs float32 matmuls and convolutions in TF32 on this GPU by "
                         "default; gpu_highest sets JAX_DEFAULT_MATMUL_PRECISION=highest")
        return entry

    def seeds(self, deadline: float) -> dict:
        if self.smoke:
            opts = {"seeds_list": [1, 2], "rounds": 1, "train_images": 256}
        elif self.gpu:
            opts = {"seeds_list": [1, 8, 32], "rounds": 2}
        else:
            opts = {"seeds_list": [1, 8, 32], "rounds": 1, "train_images": 6400}
        entry = self.child("seeds", opts, deadline)
        entry["asked"] = opts
        return entry

    def _train(self, name: str, env: dict, deadline: float, *, report: bool,
               flags: list[str] = ()) -> dict:
        run_dir = self.work / f"train_{name}"
        if self.smoke:
            data = ["--train-csv", str(self.work / "tiny" / "train.csv"),
                    "--test-csv", str(self.work / "tiny" / "test.csv"), "--epochs", "1"]
        else:
            data = ["--data-source", "idx", "--manual-dir", str(self.manual_dir),
                    *([] if self.gpu else ["--epochs", "1"])]
        command = [sys.executable, "scripts/train.py", "--workdir", str(run_dir), "--seed", "0",
                   "--no-progress", "--compile-cache", "none", *data, *flags,
                   *([] if report else ["--no-report"])]
        ran = self.run(command, deadline, env=env, marks=(
            "device:", "images:", "compiled", "first epoch starts", "model kept"))
        entry = {"command": " ".join(["python", *command[1:]]).replace(str(self.work), "WORK"),
                 "env": env, "rc": ran["rc"], "wall_s": ran["seconds"],
                 "status": "ok" if ran["rc"] == 0 else "failed" if not ran["timed_out"]
                 else PARTIAL if (run_dir / "history.jsonl").exists() else STOPPED,
                 "run_dir": str(run_dir)}
        if ran["rc"] != 0:
            entry["stderr_tail"] = ran["stderr_tail"]
        entry["device"] = ran["first_line"]  # "device: gpu (NVIDIA H100 ...), jax ..."
        entry.update(_train_split(run_dir, ran))
        return entry


def _tiny_csv(manual_dir: Path, folder: Path, n_train: int = 512, n_test: int = 256) -> None:
    """The first images of the official files (in tfds's order) as Kaggle-format CSV files
    (train.csv, test.csv): the smoke run's train.py data, small enough to train in seconds."""
    from fmnist_jax.data import Split, load_idx, write_csv_split

    folder.mkdir(parents=True, exist_ok=True)
    for name, split, n in zip(("train.csv", "test.csv"), load_idx(manual_dir), (n_train, n_test)):
        write_csv_split(Split(split.images_NxHxWx1[:n], split.labels_N[:n]), folder / name)


def _train_split(run_dir: Path, ran: dict) -> dict:
    """A train.py run's wall time split: from its stdout lines' arrival times and its run
    folder's timing.jsonl and history.jsonl."""
    marks, split = ran["marks"], {}
    rows = [json.loads(line) for line in (run_dir / "timing.jsonl").read_text().splitlines()
            ] if (run_dir / "timing.jsonl").exists() else []
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()
               ] if (run_dir / "history.jsonl").exists() else []
    first = next((r for r in rows if "compile_seconds" in r), {})
    epochs = [r for r in rows if "train_seconds" in r]
    split["compile_s"] = first.get("compile_seconds")
    split["imports_s"] = marks.get("device:")  # the process's start to its first line
    split["to_first_epoch_s"] = marks.get("first epoch starts")
    split["epochs"] = len(epochs)
    split["train_s"] = round(sum(r["train_seconds"] for r in epochs), 3)
    split["eval_s"] = round(sum(r.get("eval_seconds", 0) for r in epochs), 3)
    split["checkpoint_s"] = round(sum(r["checkpoint_seconds"] for r in rows
                                      if "checkpoint_seconds" in r), 3)
    split["epoch_s"] = [round(r["train_seconds"], 3) for r in epochs]
    if "model kept" in marks and "first epoch starts" in marks:
        split["epochs_wall_s"] = round(marks["model kept"] - marks["first epoch starts"], 2)
        split["after_epochs_s"] = round(ran["seconds"] - marks["model kept"], 2)
    if history:
        split["final"] = {k: history[-1].get(k) for k in ("epoch", "train_loss",
                                                          "test_accuracy", "test_loss")}
        # Every epoch's, so that a run stopped early is compared with the others at its last.
        split["test_accuracy_by_epoch"] = [row.get("test_accuracy") for row in history]
    return split


def _junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # a test that Ctrl-C stopped: a nameless entry
            counts["interrupted"] = counts.get("interrupted", 0) + 1
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            node = case.find("failure") if "failure" in kinds else case.find("error")
            failures.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part still runs")
    parser.add_argument("--manual-dir", default=os.environ.get("FMNIST_MANUAL_DIR"),
                        help="the four official .gz files (default $FMNIST_MANUAL_DIR)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole check's time (default 480, smoke 240)")
    args = parser.parse_args(argv)
    manual = Path(args.manual_dir) if args.manual_dir else None
    missing = [f for f in MANUAL_FILES if manual is None or not (manual / f).is_file()]
    if missing:
        print(f"error: --manual-dir {manual} lacks {missing[0]}: pass the folder of the four "
              f"official .gz files (or set FMNIST_MANUAL_DIR)", file=sys.stderr)
        return 1
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {out} cannot be made ({e.strerror}): pass another --out",
              file=sys.stderr)
        return 1
    check = Check(out, manual.absolute(), smoke=args.smoke,
                  budget_s=args.budget_s or (240 if args.smoke else 480))
    check.write()
    try:
        check.part("environment", check.environment)
        check.part("tests", check.tests)
        check.part("conv_formulations", check.conv_formulations)
        check.part("bench_lenet5", lambda d: check.bench("lenet5", d))
        check.part("train_run", check.train_run)
        check.part("precision", check.precision)
        check.part("seeds", check.seeds)
        if check.smoke:
            check.results["parts"]["bench_cnn"] = {"status": "skipped: smoke (the lenet5 "
                                                             "bench runs the same code)"}
            check.write()
        else:
            check.part("bench_cnn", lambda d: check.bench("cnn", d))
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
    print(f"wrote {out / JSON_FILE} and {out / MD_FILE} in {time.time() - check.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
