"""--seeds: M models under jax.vmap, each equal to the single run of its seed."""

import json
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fmnist_jax import streams
from fmnist_jax.run import checkpoints, folder, parallel, results
from fmnist_jax.run.history import load_history
from fmnist_jax.run.presets import get_config
from fmnist_jax.data import HALF, Normalization, train_val_indices
from fmnist_jax.errors import FmnistError
from fmnist_jax.metrics import mean_and_interval
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.seeds import evaluate_seeds, train_epoch_seeds
from fmnist_jax.steps import create_train_state, evaluate, train_epoch
from tests.helpers import make_split, one_error_line, run_script, train_quietly


def _largest_difference(tree_a, tree_b) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree_util.tree_leaves(tree_a),
                               jax.tree_util.tree_leaves(tree_b)))


@pytest.mark.slow  # five programs to compile: about 12 s
def test_a_member_of_the_vmapped_epoch_is_its_own_single_epoch():
    """Two LeNet-5 members, each on its own split of one shared image set: the active one
    trains as `train_epoch` on its images would, the stopped one keeps its state exactly, and
    `evaluate_seeds` on each member's validation indices is `evaluate` on those images."""
    train = make_split(256, seed=0)
    seeds = [4, 5]
    splits = [train_val_indices(train.labels_N, 0.25, seed) for seed in seeds]
    model, tx = get_model("lenet5"), make_optimizer(get_config(), 6)
    states = [create_train_state(model, tx, streams.stream_key(seed, streams.INIT))
              for seed in seeds]
    state_M = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)
    one_at_a_time_M = jax.tree_util.tree_map(jnp.copy, state_M)
    init_1 = jax.device_get(states[1].params)
    norm_M = Normalization(np.full(2, 0.5, np.float32), np.full(2, 0.5, np.float32))
    key_M = jnp.stack([streams.epoch_shuffle_key(seed, 1) for seed in seeds])
    train_idx_MxQ = np.stack([t for t, _ in splits]).astype(np.int32)
    state_M, sums_M = train_epoch_seeds(
        state_M, train.images_NxHxWx1, train.labels_N, train_idx_MxQ, key_M,
        np.array([True, False]), batch_size=32, norm_M=norm_M)  # in lockstep (vmap)
    one_at_a_time_M, one_at_a_time_sums = train_epoch_seeds(
        one_at_a_time_M, train.images_NxHxWx1, train.labels_N, train_idx_MxQ, key_M,
        np.array([True, False]), batch_size=32, norm_M=norm_M, members_at_once=1)
    val_idx_MxQ = np.stack([v for _, v in splits]).astype(np.int32)
    val_sums_M = evaluate_seeds(state_M, train.images_NxHxWx1, train.labels_N, val_idx_MxQ,
                                batch_size=50, norm_M=norm_M)
    # The stopped member's evaluation skipped (one after another), the other's the same.
    val_active_M = evaluate_seeds(one_at_a_time_M, train.images_NxHxWx1, train.labels_N,
                                  val_idx_MxQ, np.array([True, False]), batch_size=50,
                                  norm_M=norm_M, members_at_once=1)

    train_idx, val_idx = splits[0]
    single, sums = train_epoch(states[0], train.images_NxHxWx1[train_idx],
                               train.labels_N[train_idx], streams.epoch_shuffle_key(4, 1),
                               batch_size=32, norm=HALF)
    member_0 = jax.tree_util.tree_map(lambda leaf: leaf[0], state_M)
    print(f"largest parameter difference: {_largest_difference(member_0.params, single.params)}")
    chex.assert_trees_all_close(member_0.params, single.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(member_0.opt_state, single.opt_state, rtol=1e-5, atol=1e-6)
    assert int(member_0.step) == int(single.step) == len(train_idx) // 32
    assert int(sums_M.correct[0]) == int(sums.correct)
    np.testing.assert_allclose(float(sums_M.loss[0]), float(sums.loss), rtol=1e-5)
    val = evaluate(single, train.images_NxHxWx1[val_idx], train.labels_N[val_idx],
                   batch_size=50, norm=HALF)
    assert int(val_sums_M.count[0]) == int(val.count) == len(val_idx)
    np.testing.assert_allclose(float(val_sums_M.loss[0]), float(val.loss), rtol=1e-5)
    assert float(val_active_M.loss[0]) == float(val.loss)  # one after another: to the bit
    assert int(val_active_M.count[1]) == 0 and int(val_sums_M.count[1]) == len(val_idx)
    # The stopped member: not one bit changed, step included.
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           jax.tree_util.tree_map(lambda leaf: leaf[1], state_M.params), init_1)
    assert int(state_M.step[1]) == 0
    # One member after another (a CPU's way, `members_at_once=1`): the single epoch to the
    # bit, where the lockstep differs in the last bits; the stopped member kept as well.
    chex.assert_trees_all_equal(
        jax.tree_util.tree_map(lambda leaf: leaf[0], (one_at_a_time_M.params,
                                                      one_at_a_time_M.opt_state)),
        (single.params, single.opt_state))
    assert float(one_at_a_time_sums.loss[0]) == float(sums.loss)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(
        lambda leaf: leaf[1], one_at_a_time_M.params), init_1)
    # The stopped member was skipped, not trained and thrown away: nothing counted.
    assert int(one_at_a_time_sums.count[1]) == int(sums_M.count[1]) == 0
    assert "stablehlo.case" in train_epoch_seeds.lower(  # a real branch (vmap: a select)
        one_at_a_time_M, train.images_NxHxWx1, train.labels_N, train_idx_MxQ, key_M,
        np.array([True, False]), batch_size=32, norm_M=norm_M, members_at_once=1).as_text()


def _splits():
    return make_split(512, seed=0), make_split(300, seed=1)


# On a CPU the members of a run of seeds train one after another (`parallel.
# members_at_once_for`), each computing what its single run computes: equal to the bit.
# Where they train in lockstep under vmap (a GPU), the sums run in another order: equal
# within the tolerances the tests give.
EXACT = parallel.members_at_once_for(jax.default_backend()) == 1


def _best_without_sums(run_dir):
    """best.json less the checksums of the model's checkpoint, which differ between two
    saves of the same state (orbax names its data files at random and records the time)."""
    best = checkpoints.load_best(run_dir)
    assert best.pop(folder.CHECKPOINT_SUMS)
    return best


def _check_members_equal_single_runs(tmp_path, cfg, *, rtol, atol):
    """Train `cfg` (seeds > 1), then each member's config alone; compare every history
    value, best.json and the kept parameters (bit for bit where `EXACT`, else within `rtol`
    and `atol`). Returns (the seeds run's final state, its histories, the largest parameter
    difference)."""
    if EXACT:
        rtol = atol = 0
    state_M, histories = train_quietly(cfg, tmp_path / "seeds", _splits())
    assert (tmp_path / "seeds" / folder.SUMMARY_FILE).is_file()
    largest = largest_in_history = 0.0
    for m, member in enumerate(cfg.members()):
        member_dir = folder.member_dir(tmp_path / "seeds", member.seed)
        single_dir = tmp_path / f"single-{member.seed}"
        _, single_history = train_quietly(member, single_dir, _splits())
        assert folder.load_config(member_dir) == member
        assert [row["epoch"] for row in histories[m]] == [row["epoch"] for row in single_history]
        assert load_history(member_dir) == histories[m]
        for row, single_row in zip(histories[m], single_history):
            assert row.keys() == single_row.keys()
            np.testing.assert_allclose(list(row.values()), list(single_row.values()),
                                       rtol=rtol, atol=atol)
            largest_in_history = max(largest_in_history, *(
                abs(row[key] - single_row[key]) for key in row))
        assert _best_without_sums(member_dir) == _best_without_sums(single_dir)
        kept, single_kept = (checkpoints.load_variables(d, member)
                             for d in (member_dir, single_dir))
        chex.assert_trees_all_close(kept, single_kept, rtol=rtol, atol=atol)
        largest = max(largest, _largest_difference(kept, single_kept))
    print(f"largest difference of the kept variables: {largest:.3g}; of a history value: "
          f"{largest_in_history:.3g}")
    return state_M, histories, largest


@pytest.mark.slow
def test_members_equal_single_runs_and_stop_early_on_their_own(tmp_path):
    """LeNet-5 with a plateau schedule and early stopping: each seed stops at its own epoch;
    a stopped member's state stays as it was at its last epoch while the others train on."""
    cfg = get_config(epochs=4, batch_size=32, eval_batch_size=100, val_fraction=0.2, seed=4,
                     seeds=3, decay="plateau", plateau_patience=1, patience=1)
    state_M, histories, _ = _check_members_equal_single_runs(tmp_path, cfg, rtol=1e-5,
                                                             atol=1e-6)
    epochs_M = [len(history) for history in histories]
    assert len(set(epochs_M)) > 1, epochs_M  # the seeds stopped at different epochs
    steps_per_epoch = int(state_M.step[0]) // epochs_M[0]
    assert [int(step) for step in state_M.step] == [e * steps_per_epoch for e in epochs_M]
    for m, member in enumerate(cfg.members()):  # each final state is its last checkpoint's
        manager = checkpoints.Checkpoints(folder.member_dir(tmp_path / "seeds", member.seed))
        member_state = jax.tree_util.tree_map(lambda leaf, m=m: leaf[m], state_M)
        stored = manager.restore(epochs_M[m], member_state)
        manager.close()
        jax.tree_util.tree_map(np.testing.assert_array_equal, stored.params, member_state.params)
    # A member folder is an ordinary run: one killed before its best.json was written is
    # resumed alone from the checkpoints the vmapped run wrote, and ends the same.
    member_dir = folder.member_dir(tmp_path / "seeds", 5)
    kept = checkpoints.load_variables(member_dir, cfg.members()[1])
    (member_dir / folder.BEST_FILE).unlink()
    train_quietly(cfg.members()[1], folder.reopen(member_dir), _splits())
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           checkpoints.load_variables(member_dir, cfg.members()[1]), kept)
    _check_the_folder_resumes_whole(tmp_path, cfg, state_M, epochs_M)


def _check_the_folder_resumes_whole(tmp_path, cfg, state_M, epochs_M):
    """The whole folder resumed, as a kill during the last epoch's saves leaves it: seed 4
    without its last checkpoint (so behind the others), seed 5 with all (finished, but no
    summary yet), seed 6 with none (from the start). It ends as the uninterrupted run: the
    same history, best.json (but the checksums of checkpoints written again), parameters
    and summary, and final states."""
    source, target = tmp_path / "seeds", tmp_path / "resumed"
    shutil.copytree(source, target)
    (target / folder.SUMMARY_FILE).unlink()
    starts = []
    for m, member in enumerate(cfg.members()):
        member_dir = folder.member_dir(target, member.seed)
        if m != 1:  # seed 5 finished: its best.json stays
            (member_dir / folder.BEST_FILE).unlink()
        kept = sorted(int(step_dir.name) for step_dir in (member_dir / folder.CHECKPOINTS_DIR).iterdir())
        keep = {0: kept[:-1], 1: kept, 2: []}[m]
        for epoch in set(kept) - set(keep):
            shutil.rmtree(member_dir / folder.CHECKPOINTS_DIR / str(epoch))
        starts.append(max(keep, default=0))
    assert len(set(starts)) == 3, starts  # three different places to go on from
    run = folder.reopen(target)
    assert run.resumed and [member.path.name for member in run.members] == [
        "seed-4", "seed-5", "seed-6"]
    resumed_M, histories = train_quietly(run.config, run, _splits())
    assert [len(history) for history in histories] == epochs_M
    for member in cfg.members():
        a, b = (folder.member_dir(run_dir, member.seed) for run_dir in (source, target))
        assert (a / folder.HISTORY_FILE).read_bytes() == (b / folder.HISTORY_FILE).read_bytes()
        assert _best_without_sums(a) == _best_without_sums(b), member.seed
        jax.tree_util.tree_map(np.testing.assert_array_equal, checkpoints.load_variables(a, member),
                               checkpoints.load_variables(b, member))
    assert results.load_summary(target) == results.load_summary(source)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_M.params, state_M.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_M.opt_state,
                           state_M.opt_state)
    assert folder.finished(target)
    with pytest.raises(FmnistError, match="has finished training"):
        folder.reopen(target)


@pytest.mark.slow
def test_batchnorm_dropout_augmentation_members_equal_single_runs(tmp_path):
    """The MLP (BatchNorm statistics, dropout) with augmentation, label smoothing, an EMA of
    the weights (evaluated and kept) and each seed's own dataset normalization. SGD, not the
    preset's AdamW: the dense biases before BatchNorm have a zero gradient, which Adam turns
    into full-size steps of float noise, so under any change of summation order they wander
    by up to lr per step (seen: 7e-3 after 12 steps) though the model's outputs do not depend
    on them."""
    cfg = get_config("mlp", epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.2,
                     seed=4, seeds=2, optimizer="sgd", weight_decay=0.0,
                     weight_decay_params="kernels", learning_rate=0.05,
                     label_smoothing=0.1, normalization="dataset", ema_decay=0.9)
    _check_members_equal_single_runs(tmp_path, cfg, rtol=1e-4, atol=1e-5)


def test_mean_std_and_student_t_interval():
    values = [0.9021, 0.8931, 0.8961, 0.9007]
    summary = mean_and_interval(values)
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values),
                                 scale=stats.sem(values))  # sem uses ddof=1
    assert summary["interval"] == pytest.approx([low, high])
    with pytest.raises(ValueError):
        mean_and_interval([0.9])


def test_a_seeds_folder_claims_one_run_folder_per_seed_and_gives_them_back(tmp_path):
    cfg = get_config(seed=7, seeds=3)
    claim = folder.claim(tmp_path / "run", cfg)
    assert [member.path.name for member in claim.members] == ["seed-7", "seed-8", "seed-9"]
    assert [folder.load_config(member.path) for member in claim.members] == cfg.members()
    assert all(member.seeds == 1 for member in cfg.members())
    stored = json.loads((tmp_path / "run" / folder.SEEDS_FILE).read_text())
    assert stored["runs"] == ["seed-7", "seed-8", "seed-9"] and stored["config"]["seeds"] == 3
    with pytest.raises(FmnistError, match="already holds a run"):
        folder.claim(tmp_path / "run", cfg)
    with pytest.raises(FmnistError, match="holds the runs of several seeds.*seed-7"):
        folder.load_config(tmp_path / "run")
    folder.abandon(claim)  # the seeds' locks too: a second abandon closes nothing twice
    folder.abandon(claim)
    assert not (tmp_path / "run").exists()


def test_seeds_past_the_largest_seed_are_refused():
    with pytest.raises(FmnistError, match="lower --seed or --seeds"):
        get_config(seed=2**32 - 2, seeds=3)


@pytest.mark.slow
def test_more_seeds_than_one_run_can_hold_are_refused_before_any_folder(tmp_path):
    """--seeds 100000 made every member's folder and split, silently, for minutes: now it is
    refused with the config, before the devices, the run folder or the data."""
    with pytest.raises(FmnistError, match="seeds 1001 is more than the 1000 one run can train"):
        get_config(seeds=1001)
    assert get_config(seeds=1000).seeds == 1000
    try:
        result = run_script("train.py", "--seeds", "100000", "--workdir", tmp_path / "run",
                            timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("--seeds 100000 was not refused within 60 s")
    assert one_error_line(result) == (
        "error: seeds 100000 is more than the 1000 one run can train (their models and "
        "optimizer states are held together, and each seed writes a run folder every "
        "epoch): lower --seeds, or split the seeds over several runs with --seed")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_seeds_that_do_not_fit_in_memory_are_refused_before_they_are_built(monkeypatch):
    """The members' states and splits are estimated from one member's shapes against the
    machine's memory, before any member is built (one state, traced, for its shapes)."""
    from fmnist_jax.run import prepare

    train = make_split(200, seed=1)
    cfg = get_config(batch_size=30)  # lenet5: 740,484 bytes of state, Adam's moments included
    per_member = 4 * 740_484 + 16 * 200
    monkeypatch.setattr(prepare, "host_memory_bytes", lambda: 2 * per_member + 1)
    built = []
    real_create = prepare.create_train_state
    monkeypatch.setattr(prepare, "create_train_state",
                        lambda *a, **k: built.append(1) or real_create(*a, **k))
    with pytest.raises(FmnistError) as info:
        prepare.seed_members(cfg, train.labels_N, list(range(1000)))
    assert str(info.value) == (
        f"--seeds 1000 of lenet5 need about {1000 * per_member / 2**30:.1f} GiB (their "
        f"weights, optimizer states and splits), more than this machine's "
        f"{(2 * per_member + 1) / 2**30:.1f} GiB of memory: pass --seeds 2 or fewer, and the "
        f"other seeds in another run with --seed")
    assert len(built) == 1  # under jax.eval_shape: no member's arrays were made


@pytest.fixture
def seeds_folder(tmp_path):
    folder.claim(tmp_path / "run", get_config(seeds=2)).release()
    return tmp_path / "run"


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--seeds", "0"], "error: seeds must be at least 1, got 0"),
    ("train.py", ["--seeds", "2", "--resume", "{run}/seed-0"],
     "error: --seeds 2 contradicts the run's config (1)"),
    ("train.py", ["--seeds", "3", "--resume", "{run}"],
     "error: --seeds 3 contradicts the run's config (2)"),
    ("evaluate.py", ["{run}"], "seed-0 holds an unfinished run (no checkpoint yet): continue it "
                               "with `python scripts/train.py --resume {run}`"),
    ("predict.py", ["{run}", "x.png"], "holds the runs of several seeds, one folder each"),
    ("bench.py", ["--seeds", "2"], "unrecognized arguments: --seeds"),
])
def test_bad_seeds_input_is_one_line(seeds_folder, script, args, message, run_main):
    """In this process: every case fails before the devices start (a real process's exit
    status: test_loop's bad flag; --seeds refused in time: the test above)."""
    result = run_main(script, *[arg.format(run=seeds_folder) for arg in args])
    assert message.format(run=seeds_folder) in one_error_line(result)


def test_a_seeds_folder_is_reopened_whole_or_not_at_all(seeds_folder):
    """Every seed's folder is taken back (each locked), none when one is being trained or
    holds another config; with summary.json the run has finished."""
    run = folder.reopen(seeds_folder)
    assert run.resumed and run.config.seeds == 2
    assert [member.config for member in run.members] == get_config(seeds=2).members()
    with pytest.raises(FmnistError, match="seed-0 is being trained by another process"):
        folder.reopen(seeds_folder)
    run.members[0].release()
    with pytest.raises(FmnistError, match="seed-1 is being trained by another process"):
        folder.reopen(seeds_folder)  # seed-0's lock, taken on the way, is given back
    run.members[1].release()
    folder.reopen(seeds_folder).release()
    member_config = folder.member_dir(seeds_folder, 1) / folder.CONFIG_FILE
    member_config.write_text(get_config(seed=5).to_json())
    with pytest.raises(FmnistError, match="seed-1/config.json was edited after the run began "
                                          r"\(seed 1 -> 5\)"):
        folder.reopen(seeds_folder)
    (seeds_folder / folder.SUMMARY_FILE).write_text("{}")
    assert folder.finished(seeds_folder)
    with pytest.raises(FmnistError, match="has finished training"):
        folder.reopen(seeds_folder)


@pytest.mark.slow
def test_train_script_prints_the_seed_table_and_reports_each_seed(tmp_path):
    from fmnist_jax.data import write_csv_split

    train, test = _splits()
    write_csv_split(train, tmp_path / "train.csv")
    write_csv_split(test, tmp_path / "test.csv")
    result = run_script("train.py", "--seeds", "3", "--seed", "4", "--epochs", "2",
                        "--batch-size", "32", "--eval-batch-size", "100", "--val-fraction",
                        "0.2", "--no-progress", "--workdir", tmp_path / "run", "--train-csv",
                        tmp_path / "train.csv", "--test-csv", tmp_path / "test.csv",
                        "--compile-cache", "none", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = results.load_summary(tmp_path / "run")
    assert [row["seed"] for row in summary["seeds"]] == [4, 5, 6]
    lines = result.stdout.splitlines()
    assert "seed  epochs  kept epoch  val acc  test acc" in lines
    assert "early stop" not in result.stdout  # no --patience
    assert any(line.startswith(f"test accuracy over 3 seeds: mean {summary['mean']:.4f}, std ")
               and "95% CI" in line for line in lines)
    for seed in (4, 5, 6):  # each seed's folder is a complete run, with its report
        member_dir = folder.member_dir(tmp_path / "run", seed)
        assert folder.finished(member_dir) and (member_dir / folder.REPORT_JSON_FILE).is_file()
    # and the figures over the seeds: the reports' accuracies are the summary's
    over = json.loads((tmp_path / "run" / folder.SEEDS_REPORT_FILE).read_text())
    assert over["metrics"]["accuracy"]["mean"] == pytest.approx(summary["mean"], abs=1e-6)
    assert over["metrics"]["val_accuracy"]["per_seed"] == {
        str(row["seed"]): pytest.approx(row["val_accuracy"]) for row in summary["seeds"]}
    assert "over 3 seeds (4, 5, 6): mean, 95% CI (Student t), then each seed" in lines
    assert "flip_tta" not in over["metrics"]
    # Killed before summary.json, seed 6 without its checkpoints: --resume of the folder
    # retrains seed 6 alone and writes the same summary.
    (tmp_path / "run" / folder.SUMMARY_FILE).unlink()
    shutil.rmtree(folder.member_dir(tmp_path / "run", 6) / folder.CHECKPOINTS_DIR)
    resumed = run_script("train.py", "--resume", tmp_path / "run", "--seeds", "3",
                         "--no-progress", "--no-report", "--train-csv", tmp_path / "train.csv",
                         "--test-csv", tmp_path / "test.csv", "--compile-cache", "none",
                         timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resumed {tmp_path / 'run'}: seed 4 after epoch 2, seed 5 after epoch 2, seed 6 "
            f"after epoch 0") in resumed.stdout
    assert "epoch   1  mean of 1 seeds" in resumed.stdout
    assert "early stop" not in resumed.stdout
    assert results.load_summary(tmp_path / "run") == summary
    again = run_script("train.py", "--resume", tmp_path / "run")
    assert again.returncode == 0 and "already finished training" in again.stdout
    # evaluate.py on the folder: a report for every seed, and flip TTA over the seeds.
    for seed in (4, 5, 6):
        (folder.member_dir(tmp_path / "run", seed) / folder.REPORT_JSON_FILE).unlink()
    evaluated = run_script("evaluate.py", tmp_path / "run", "--tta", "flip", "--train-csv",
                           tmp_path / "train.csv", "--test-csv", tmp_path / "test.csv",
                           "--compile-cache", "none", timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    flips = []
    for seed in (4, 5, 6):
        report_path = folder.member_dir(tmp_path / "run", seed) / folder.REPORT_JSON_FILE
        flips.append(json.loads(report_path.read_text())["flip_tta"]["accuracy"])
    over = json.loads((tmp_path / "run" / folder.SEEDS_REPORT_FILE).read_text())
    assert over["metrics"]["flip_tta"]["mean"] == pytest.approx(np.mean(flips))


def test_seed_members_stacks_each_seeds_own_split_and_initial_state():
    """The set-up `train.py --seeds` and `seed_timing` share: member k is seed k's split and
    the state `create_train_state` gives seed k alone."""
    from fmnist_jax.run.prepare import seed_members

    train = make_split(200, seed=1)
    cfg = get_config(batch_size=30, val_fraction=0.2)
    splits, state_M, steps_per_epoch = seed_members(cfg, train.labels_N, [3, 7])
    assert steps_per_epoch == 160 // 30
    for member, seed in enumerate([3, 7]):
        expected_train, expected_val = train_val_indices(train.labels_N, 0.2, seed)
        np.testing.assert_array_equal(splits[member][0], expected_train)
        np.testing.assert_array_equal(splits[member][1], expected_val)
        alone = create_train_state(get_model(cfg.model), make_optimizer(cfg, steps_per_epoch),
                                   streams.stream_key(seed, streams.INIT))
        chex.assert_trees_all_equal(
            jax.tree_util.tree_map(lambda leaf, m=member: leaf[m], state_M.params), alone.params)
    assert not np.array_equal(splits[0][1], splits[1][1])


@pytest.mark.slow  # four programs to compile: about 6 s
def test_time_seeds_prints_one_row_per_k_against_the_one_model_epoch():
    from benchmarks.seed_timing import markdown_table, seed_rows

    train = make_split(160, seed=2)
    progress = []  # after every round, the rows so far (a stopped caller keeps them)
    table = markdown_table(seed_rows(get_config(batch_size=32), train, [2], 2, on_progress=lambda
                                     rows: progress.append([len(r["epoch_s"]) for r in rows])))
    assert progress == [[1, 1, 1], [2, 2, 2]]
    rows = table.splitlines()[2:]
    # This process has one CPU device: K = 2 in lockstep, and as train.py runs it there, one
    # after another (the split over devices: the next test).
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 1 (one model, no vmap)", "1", ""], ["| 2", "1", "in lockstep (vmap)"],
        ["| 2", "1", "one after another"]]
    assert " 1.00x | 1.00x |" in rows[0]  # the baseline against itself
    n_train = len(train_val_indices(train.labels_N, 0.1, 0)[0])  # the preset's 10% held out
    assert all(row.split(" | ")[3] == str(n_train) for row in rows)


_TIME_SEEDS_ON_TWO_DEVICES = """
from fmnist_jax.run import parallel
parallel.use_cpu_devices(2)
from fmnist_jax.run.presets import get_config
from benchmarks.seed_timing import time_seeds
from tests.helpers import make_split
print(time_seeds(get_config(batch_size=32), make_split(160, seed=2), [2, 3], epochs=1))
"""


@pytest.mark.slow
def test_time_seeds_also_times_each_k_shared_out_over_the_devices():
    """With 2 devices: K = 2 and 3 in lockstep on one device, and as train.py runs them on
    both (2 groups; for 3 seeds, one place spare)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    result = subprocess.run([sys.executable, "-c", _TIME_SEEDS_ON_TWO_DEVICES], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 1 (one model, no vmap)", "1", ""], ["| 2", "1", "in lockstep (vmap)"],
        ["| 2", "2 (2 groups of seeds)", "one after another"],
        ["| 3", "1", "in lockstep (vmap)"],
        ["| 3", "2 (2 groups of seeds, 1 spare place)", "one after another"]]
