"""The host loop: `train_and_evaluate(cfg, workdir, train=..., test=...)` -> (state, history).

The data goes to the device once; each epoch is one call of the jitted `train_epoch` (a
`lax.scan` over every step) and one of `evaluate` per eval set; the host reads metrics once
per epoch. Compilation is done ahead of time and timed apart from the epochs (`prepare`).
Each model's run folder is kept by a `Member`: its history, best epoch, checkpoints and
early stopping.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from fmnist_jax import data, metrics
from fmnist_jax.errors import FmnistError
from fmnist_jax.run import checkpoints, folder, history, interrupts, prepare, results, sweep
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.parallel import is_writer
from fmnist_jax.steps import TrainState

# Orbax's asynchronous save: the state is copied off the device, then written while the next
# epoch trains. Off: a synchronous checkpoint is a small share of a CPU epoch (BENCHMARKS.md),
# and a background writer would race the epoch that donates the state's buffers.
ASYNC_CHECKPOINTS = False


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path | folder.Claim, *,
                       train: data.Split, test: data.Split,
                       log_fn: Callable[[str], Any] = tqdm.write,
                       progress: bool = True,
                       started: float | None = None) -> tuple[TrainState, list[Any]]:
    """Train `cfg` on `train` (less its validation split) and evaluate on the validation
    split and `test` after every epoch; write the run folder `workdir` (see `run.folder`).

    `workdir` is a folder to claim, or a `folder.Claim` made earlier (the command line claims
    the folder before loading the data). Until the first epoch is written, any failure
    (a refused setup, Ctrl-C while compiling) gives the claim back. A claim from
    `folder.reopen` continues the run from its latest checkpoint (from the start without one):
    the epochs after it are trained again with the same keys, so the history and the
    parameters come out as an uninterrupted run's.

    Every `cfg.checkpoint_every` epochs, at every new best validation accuracy and at the
    last epoch, the whole state goes to checkpoints/. With `cfg.patience`, training stops
    once the validation accuracy has not risen for that many epochs. The run's model is the
    checkpoint of the best epoch (by validation accuracy; the last epoch without a
    validation split), which best.json names, written last.

    With `cfg.seeds` = M > 1, M models (seeds cfg.seed, cfg.seed + 1, ...) train as one
    program (`seeds.train_epoch_seeds`: in lockstep under `jax.vmap` on a GPU, one after
    another on a CPU), each in its own run folder `workdir/seed-S/` with everything above,
    each trained as a run of `cfg.members()[m]` is (the same keys and batches; bit for bit
    on a CPU; in lockstep or with a seed's batches split over several devices the float
    sums run in another order, so the numbers agree to the last bits at first and drift
    apart over many steps, as on another machine); one that stops early keeps its state
    while the others go on. summary.json in `workdir` then gets each seed's test accuracy
    and their mean with a 95% interval. A sweep (`cfg.sweep`) is the same with a member per
    grid point and seed (`TrainConfig.members`), and sweep.json at the end (`sweep`).

    `started`, a `time.perf_counter()` reading taken when the command started: timing.jsonl
    then records `startup_seconds`, the time from it to the first epoch.

    The batches are split over every device (`parallel`; the batch sizes must be multiples
    of the device count, which the compiled epochs check); with M > 1 seeds the devices are
    first shared out to groups of seeds (`parallel.seed_groups`), each batch then split over
    its group. With several processes (`parallel.initialize_distributed`) every process
    calls this with the same arguments; process 0 alone logs and writes the files.

    Returns (final TrainState, list of per-epoch metric dicts); with M > 1 seeds, the state's
    leaves have a leading axis M and the list holds each seed's history.
    """
    # A resumed run keeps the settings it began with, even one a new run may not pass.
    cfg.validate(stored=isinstance(workdir, folder.Claim) and workdir.resumed)
    if not is_writer():
        log_fn, progress = (lambda line: None), False
    run = workdir if isinstance(workdir, folder.Claim) else folder.claim(workdir, cfg)
    if run.config != cfg:
        raise ValueError("the run folder was claimed for another config")
    try:
        try:
            if run.resumed:  # before the data goes to the device: a damaged one is refused
                for claim in run.members or (run,):
                    checkpoints.check_checkpoints(claim.path)
            state, program = prepare.set_up(cfg, run, train, test, log_fn)
            interrupts.raise_if_pending()  # Ctrl-C while compiling, swallowed: give it back
        except BaseException:
            folder.abandon(run)
            raise
        has_val = "val" in program.eval_sets
        with contextlib.ExitStack() as stack:
            members = [stack.enter_context(Member(claim, cfg, resumed=run.resumed,
                                                  has_val=has_val, label=_label(run, claim)))
                       for claim in run.members or (run,)]
            state = _resume(state, program, members, run.path, log_fn)
            state = _epochs(cfg, state, program, members, log_fn, progress, started)
            kept = [member.finish(len(test), log_fn) for member in members]
    finally:
        run.release()
    if not run.members:
        return state, members[0].history
    if cfg.sweep:
        sweep.summarize(run.path, cfg, kept, log_fn)
    else:
        _summarize(run.path, kept, has_val, log_fn)
    return state, [member.history for member in members]


def _label(run: folder.Claim, claim: folder.Claim) -> str:
    """How the log lines name a member: "" for a single run, "seed S" in a run of several
    seeds, "POINT/seed-S" in a sweep."""
    if not run.members:
        return ""
    if not run.config.sweep:
        return f"seed {claim.config.seed}"
    return claim.path.relative_to(run.path).as_posix()


class Member:
    """One model's run folder while it trains: its history and timings, its best epoch, its
    checkpoints and early stopping. `active`: it still trains (not stopped early, epochs
    left). A context manager: its logs and checkpoints close on the way out."""

    def __init__(self, claim: folder.Claim, cfg: TrainConfig, *, resumed: bool, has_val: bool,
                 label: str = ""):
        self.path, self.seed, self.cfg, self.has_val = claim.path, claim.config.seed, cfg, has_val
        self.prefix = f"{label}: " if label else ""
        self.checkpoints = checkpoints.Checkpoints(claim.path, async_save=ASYNC_CHECKPOINTS)
        try:
            # Each member goes on from its own latest checkpoint: a kill during an epoch's
            # saves can leave the seeds of one run a checkpoint apart.
            self.start = (self.checkpoints.latest_epoch() or 0) if resumed else 0
            # Opening the log on resume cuts the history back to the checkpoint's epoch.
            self.log = history.EpochLog(claim.path, resume_after=self.start if resumed else None)
        except BaseException:
            self.checkpoints.close()
            raise
        # Cut here too: with several processes, the others may read before process 0 cuts.
        self.history = history.load_history(claim.path)[:self.start] if self.start else []
        self.best_epoch, self.best_val_accuracy = 0, -1.0  # ties: the earlier epoch
        for row in self.history:
            self._improves(row)
        self.trained_until = self.start
        self.active = self.start < cfg.epochs and not (self.start and self._stops(self.start))

    def __enter__(self) -> Member:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.ExitStack() as stack:
            stack.callback(self.checkpoints.close)
            self.log.__exit__(*exc)

    def _improves(self, row: dict[str, Any]) -> bool:
        if "val_accuracy" not in row or row["val_accuracy"] <= self.best_val_accuracy:
            return False
        self.best_epoch, self.best_val_accuracy = row["epoch"], row["val_accuracy"]
        return True

    def _stops(self, epoch: int) -> bool:
        return bool(self.cfg.patience) and epoch - self.best_epoch >= self.cfg.patience

    def record(self, row: dict[str, Any], timing: dict[str, float],
               host_state_fn: Callable[[], TrainState]) -> str | None:
        """The bookkeeping of the epoch `row` holds: the history row first (a kill before
        the checkpoint resumes from the earlier one and writes this row again, the same),
        then the checkpoint (`host_state_fn()` gives it), then the early stop. Returns the
        early-stop line when the member stops."""
        epoch, every = row["epoch"], self.cfg.checkpoint_every
        self.history.append(row)
        self.trained_until = epoch
        improved = self._improves(row)
        stopping = self._stops(epoch)
        self.log.epoch(row, timing)
        if improved or stopping or epoch == self.cfg.epochs or (every and epoch % every == 0):
            t0 = time.perf_counter()
            self.checkpoints.save(epoch, host_state_fn(), best_epoch=self.best_epoch)
            self.log.checkpoint_seconds(epoch, time.perf_counter() - t0)
        self.active = not (stopping or epoch == self.cfg.epochs)
        if stopping:
            return (f"{self.prefix}early stop: validation accuracy has not risen for "
                    f"{self.cfg.patience} epochs (best {self.best_val_accuracy:.4f} at epoch "
                    f"{self.best_epoch})")
        return None

    def finish(self, n_test: int, log_fn: Callable[[str], Any]) -> dict[str, Any]:
        """The end of the run: best.json (which checkpoint is the model, and its checksums;
        written last) and the "model kept" line. Returns that model's row for a summary of
        several seeds."""
        self.checkpoints.wait()
        chosen = self.best_epoch if self.has_val else self.history[-1]["epoch"]
        val_accuracy = self.best_val_accuracy if self.has_val else None
        checkpoints.save_best(self.path, {
            "epoch": chosen, "chosen_by": "val_accuracy" if self.has_val else "last epoch",
            "val_accuracy": val_accuracy, "epochs_trained": self.trained_until,
            "stopped_early": self.trained_until < self.cfg.epochs}, self.cfg)
        test_accuracy = self.history[chosen - 1]["test_accuracy"]  # resumed rows were read back
        which = (f"the best validation accuracy ({val_accuracy:.4f})" if self.has_val
                 else "the last")
        log_fn(f"{self.prefix}model kept: epoch {chosen}, {which}; its test accuracy: "
               f"{test_accuracy:.4f} ({int(round(test_accuracy * n_test))}/{n_test}); run "
               f"folder: {self.path}")
        return {"seed": self.seed, "run": self.path.name, "epoch": chosen,
                "epochs_trained": self.trained_until, "val_accuracy": val_accuracy,
                "test_accuracy": test_accuracy}


def _resume(state, program, members: list[Member], run_dir: Path, log_fn):
    """`state` with each member's replaced by its latest checkpoint's, if it has one."""
    if not any(member.start for member in members):
        return state
    state = program.with_member_states(state, [
        member.checkpoints.restore(member.start, member_state) if member.start else member_state
        for member, member_state in zip(members, program.member_states(state))])
    log_fn(f"resumed {run_dir} after epoch {members[0].start}" if len(members) == 1 else
           f"resumed {run_dir}: " + ", ".join(f"seed {member.seed} after epoch {member.start}"
                                             for member in members))
    return state


def _epochs(cfg, state, program, members: list[Member], log_fn, progress, started):
    """The host loop. Each epoch trains the active members furthest behind in one call
    (after a resume from checkpoints a seed apart, the ones behind catch up before all go
    on together), evaluates them, and hands each its row to keep. Returns the last state."""
    seeds, many = [member.seed for member in members], len(members) > 1
    startup_s = None if started is None else time.perf_counter() - started
    for member in members:
        member.log.compile_seconds(program.compiled.compile_seconds, startup_seconds=startup_s)
    if startup_s is not None:
        log_fn(f"first epoch starts {startup_s:.2f} s after the command started")
    first = min((m.trained_until for m in members if m.active), default=cfg.epochs)
    bar = tqdm(total=cfg.epochs, initial=first, desc="epochs", unit="epoch",
               disable=not progress, file=sys.stderr, leave=False)
    while any(member.active for member in members):
        interrupts.raise_if_pending()
        epoch = 1 + min(member.trained_until for member in members if member.active)
        active = [member.active and member.trained_until == epoch - 1 for member in members]
        learning_rates = program.learning_rates(state)  # this epoch's first step's
        state, train_rates, train_s = program.train(state, seeds, epoch, active)
        rows = {}
        for m in (m for m in range(len(members)) if active[m]):
            (train_loss, train_acc), prefix = train_rates[m], members[m].prefix
            if not math.isfinite(train_loss):
                raise FmnistError(f"{prefix}training diverged at epoch {epoch} (loss "
                                  f"{train_loss}): lower --learning-rate or set --clip-norm")
            rows[m] = {"epoch": epoch, "learning_rate": learning_rates[m],
                       "train_loss": train_loss, "train_accuracy": train_acc}
        t0 = time.perf_counter()
        for name in program.eval_sets:
            for m, member_rates in enumerate(program.evaluate(state, name, active)):
                if m in rows:
                    rows[m][f"{name}_loss"], rows[m][f"{name}_accuracy"] = member_rates
        eval_s = time.perf_counter() - t0
        if state.plateau is not None:
            state = program.plateau(state, [rows[m]["val_loss"] if m in rows else 0.0
                                            for m in range(len(members))], active)
        # Copied off the device once, when the first member saves a checkpoint.
        host_states_fn = functools.cache(lambda state=state: program.member_states(state))
        timing = {"train_seconds": train_s, "eval_seconds": eval_s,
                  **({"seeds_trained_together": len(members)} if many else {})}
        stop_lines = [members[m].record(row, timing, lambda m=m: host_states_fn()[m])
                      for m, row in rows.items()]
        bar.update(1)
        bar.set_postfix(loss=f"{_mean(rows, 'train_loss'):.4f}",
                        test_acc=f"{_mean(rows, 'test_accuracy'):.4f}")
        log_fn(_epoch_line(epoch, rows, program.eval_sets, train_s, eval_s, len(members),
                           "models" if cfg.sweep else "seeds"))
        for line in filter(None, stop_lines):
            log_fn(line)
    bar.close()
    return state


def _mean(rows: dict[int, dict[str, Any]], key: str) -> float:
    return sum(row[key] for row in rows.values()) / len(rows)


def _epoch_line(epoch, rows, eval_sets, train_s, eval_s, n_members, what="seeds") -> str:
    """The epoch's log line: one run's metrics, or the means over the members (`what`:
    seeds, or a sweep's models) that trained."""
    names = ["train", *eval_sets]
    metrics_text = "  ".join(f"{name} loss {_mean(rows, f'{name}_loss'):.4f} acc "
                             f"{_mean(rows, f'{name}_accuracy'):.4f}" for name in names)
    if n_members == 1:
        return f"epoch {epoch:3d}  {metrics_text}  {train_s:.2f} s (+{eval_s:.2f} s eval)"
    return (f"epoch {epoch:3d}  mean of {len(rows)} {what}  {metrics_text}  {train_s:.2f} s "
            f"(+{eval_s:.2f} s eval) for all {n_members}")


def _summarize(run_dir: Path, kept: list[dict[str, Any]], has_val: bool, log_fn) -> None:
    """summary.json of a run of several seeds, from each seed's kept model, and its lines."""
    summary = {"metric": "test accuracy of each seed's kept model (" + (
        "the best validation accuracy" if has_val else "the last epoch") + ")",
        "seeds": kept, **metrics.mean_and_interval([row["test_accuracy"] for row in kept])}
    results.save_summary(run_dir, summary)
    for line in summary_lines(summary):
        log_fn(line)
    log_fn(f"summary: {run_dir / folder.SUMMARY_FILE}")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A run of several seeds' summary.json as a table and its mean line."""
    lines = ["seed  epochs  kept epoch  val acc  test acc"]
    for row in summary["seeds"]:
        val = "      -" if row["val_accuracy"] is None else f"{row['val_accuracy']:.4f}"
        lines.append(f"{row['seed']:4d}  {row['epochs_trained']:6d}  {row['epoch']:10d}  "
                     f"{val:>7s}  {row['test_accuracy']:.4f}")
    low, high = summary["interval"]
    lines.append(f"test accuracy over {summary['n']} seeds: mean {summary['mean']:.4f}, std "
                 f"{summary['std']:.4f}, {summary['confidence']:.0%} CI [{low:.4f}, {high:.4f}] "
                 f"(Student t, {summary['n'] - 1} degrees of freedom)")
    return lines
