"""The run folder (run/folder.py, run/checkpoints.py): claiming it, verifying the model's
checkpoint, and a folder edited or damaged by hand, through the commands a user runs."""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.data import write_csv_split
from fmnist_jax.run import checkpoints, folder
from fmnist_jax.run.history import load_history
from fmnist_jax.evaluation.report import LoadedRun, evaluate_run
from tests.helpers import REPO, make_split, one_error_line, run_script, tiny_config


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run, with a report and calibration to protect."""
    copy = shutil.copytree(tiny_run[0], tmp_path / "run")
    (copy / folder.REPORT_TEXT_FILE).write_text("the good report\n")
    (copy / folder.CALIBRATION_FILE).write_text('{"temperature": 1.5}\n')
    return copy


def _untouched(run_dir):
    assert (run_dir / folder.REPORT_TEXT_FILE).read_text() == "the good report\n"
    assert (run_dir / folder.CALIBRATION_FILE).read_text() == '{"temperature": 1.5}\n'


def _largest_model_file(run_dir):
    """The largest file of the checkpoint best.json names (the model's weights are in it)."""
    model_dir = run_dir / folder.CHECKPOINTS_DIR / str(checkpoints.load_best(run_dir)["epoch"])
    return max((p for p in model_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --- claiming the folder -------------------------------------------------------------------

def test_a_folder_with_files_of_its_own_is_refused_and_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FmnistError, match="already holds files that are not a run"):
        folder.claim(tmp_path, tiny_config())
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(FmnistError, match="is a file, not a folder"):
        folder.claim(tmp_path / "notes.txt", tiny_config())
    with pytest.raises(FmnistError, match="cannot make the run folder"):
        folder.claim("/proc/self/run", tiny_config())  # unwritable, even for root


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_empty_folder_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(FmnistError, match="cannot write in the run folder"):
            folder.claim(tmp_path, tiny_config())
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("workdir,message", [
    (".", "already holds files that are not a run"),  # the repository itself
    ("/proc/self", "already holds files that are not a run"),
    ("/proc/self/run", "cannot make the run folder"),
    ("", "--workdir needs the run folder to train in, got an empty value"),  # not the default
])
def test_train_refuses_a_bad_workdir_before_loading_data(workdir, message, run_main):
    # The data dir does not exist: a data error would mean the workdir was checked too late.
    result = run_main("train.py", "--workdir", workdir, "--data-dir", "/nonexistent",
                        "--epochs", "1")
    assert message in one_error_line(result)


def test_of_many_claims_on_one_folder_exactly_one_wins(tmp_path):
    workdir, barrier, outcomes = tmp_path / "run", threading.Barrier(8), []

    def attempt():
        barrier.wait()
        try:
            outcomes.append(folder.claim(workdir, tiny_config()))
        except FmnistError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if isinstance(o, folder.Claim)]
    assert len(won) == 1 and all("already holds a run" in o for o in outcomes if o not in won)
    assert folder.load_config(workdir) == tiny_config()
    folder.abandon(won[0])  # given back before training: the folder can be used again
    assert not workdir.exists() or os.listdir(workdir) == []
    again = folder.claim(workdir, tiny_config())
    assert again.path == workdir
    again.release()


@pytest.mark.slow
def test_default_run_names_differ_between_processes():
    here = folder.default_workdir("lenet5", 0)
    there = subprocess.run(
        [sys.executable, "-c", "from fmnist_jax.run import folder; "
         "print(folder.default_workdir('lenet5', 0))"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=60).stdout.strip()
    assert str(here) != there and str(here).startswith("runs/lenet5-seed0-")


# --- the model: the best epoch's checkpoint, guarded by the checksums in best.json ------------

def test_a_full_disk_while_saving_a_checkpoint_is_one_line_saying_resume(tmp_path, tiny_run,
                                                                         monkeypatch):
    manager = checkpoints.Checkpoints(tmp_path)

    def save_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_on_a_full_disk)
    with pytest.raises(FmnistError, match="No space left on device.*free some space, then "
                                          "continue with --resume"):
        manager.save(3, tiny_run[1])
    manager.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_file_of_the_model_is_detected(run_copy, damage):
    path = _largest_model_file(run_copy)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    with pytest.raises(FmnistError, match="does not match its checksum") as error:
        checkpoints.load_variables(run_copy, tiny_config())
    assert "\n" not in str(error.value)


def test_every_file_of_the_model_checkpoint_is_guarded(run_copy):
    best = checkpoints.load_best(run_copy)
    model_dir = run_copy / folder.CHECKPOINTS_DIR / str(best["epoch"])
    assert set(best[folder.CHECKPOINT_SUMS]) == {
        str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}
    (model_dir / "default" / "extra").write_text("x")
    with pytest.raises(FmnistError, match="default/extra is damaged, missing or extra"):
        checkpoints.load_variables(run_copy, tiny_config())


@pytest.mark.slow
def test_predict_on_a_truncated_checkpoint_file_prints_one_line(run_copy, tmp_path):
    path = _largest_model_file(run_copy)
    path.write_bytes(path.read_bytes()[:1000])
    np.save(tmp_path / "x.npy", make_split(1).images_NxHxWx1)
    result = run_script("predict.py", run_copy, tmp_path / "x.npy")
    assert "does not match its checksum" in one_error_line(result)  # no asyncio noise at exit
    assert result.stdout == ""


def _as_an_earlier_version_wrote_it(run_dir):
    """`run_dir` as versions that kept the model in params/ too left it: params/ and
    params.sha256 beside the checkpoints, best.json without checksums."""
    best = checkpoints.load_best(run_dir)
    del best[folder.CHECKPOINT_SUMS]
    (run_dir / folder.BEST_FILE).write_text(json.dumps(best))
    (run_dir / folder.OLD_PARAMS_DIR).mkdir()
    (run_dir / folder.OLD_PARAMS_CHECKSUM_FILE).write_text('{"sha256": {}}')


def test_a_folder_of_an_earlier_version_loads_from_its_best_checkpoint(run_copy, tiny_run):
    _as_an_earlier_version_wrote_it(run_copy)
    assert folder.finished(run_copy)
    variables = checkpoints.load_variables(run_copy, tiny_config())  # no checksums: read as is
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"],
                           tiny_run[1].params)
    shutil.rmtree(run_copy / folder.CHECKPOINTS_DIR / "2")
    with pytest.raises(FmnistError, match="keeps its model in params/, which this version no "
                                          "longer reads.*train the run again"):
        checkpoints.load_variables(run_copy, tiny_config())


def test_non_finite_weights_are_refused(tmp_path, tiny_run):
    state = tiny_run[1]
    state = state.replace(params=jax.tree_util.tree_map(
        lambda w: w.at[(0,) * w.ndim].set(np.nan), state.params))
    manager = checkpoints.Checkpoints(tmp_path)
    manager.save(2, state)
    manager.close()
    record = {"epoch": 2, "chosen_by": "last epoch", "val_accuracy": None, "epochs_trained": 2,
              "stopped_early": False}
    # The training never hands them on: best.json is not written.
    with pytest.raises(FmnistError, match="NaN or infinite weights"):
        checkpoints.save_best(tmp_path, record, tiny_config())
    assert not (tmp_path / folder.BEST_FILE).exists()
    # A run an earlier version finished with them (best.json without checksums) is refused
    # where it is read.
    (tmp_path / folder.BEST_FILE).write_text(json.dumps(record))
    with pytest.raises(FmnistError, match="NaN or infinite weights"):
        checkpoints.load_variables(tmp_path, tiny_config())


def test_non_finite_logits_never_replace_a_good_report(run_copy):
    variables = checkpoints.load_variables(run_copy, tiny_config())
    run = LoadedRun(config=tiny_config(), normalization=folder.load_normalization(run_copy),
                    history=load_history(run_copy),
                    variables=jax.tree_util.tree_map(lambda w: w * 1e30, variables))
    with pytest.raises(FmnistError, match="NaN or infinite logits"):
        evaluate_run(run_copy, train=make_split(512), test=make_split(300, seed=1), run=run,
                     log_fn=lambda s: None)  # the tiny run's own data
    _untouched(run_copy)


def test_a_folder_in_place_of_a_figure_is_refused_before_anything_is_rewritten(run_copy,
                                                                             run_main):
    figure = run_copy / folder.PLOT_FILES["confusion_matrix"]
    figure.unlink(missing_ok=True)
    figure.mkdir()
    # No data dir: the figures' paths are checked before any data loads.
    result = run_main("evaluate.py", run_copy, "--data-dir", "/nonexistent")
    assert one_error_line(result) == (f"error: cannot write {figure} (it is a folder): move "
                                      f"it away, then evaluate again")
    _untouched(run_copy)


def test_loading_a_run_only_reads_and_the_writer_checks_its_paths(run_copy):
    from fmnist_jax.evaluation.report import load_run

    figure = run_copy / folder.PLOT_FILES["reliability"]
    figure.unlink(missing_ok=True)
    figure.mkdir()
    # A reader (benchmarks/check_calibration_errors.py) loads a run it cannot write in.
    run = load_run(run_copy)
    assert run.config == tiny_config()
    with pytest.raises(FmnistError, match=f"cannot write {figure}"):
        evaluate_run(run_copy, train=make_split(512), test=make_split(300, seed=1), run=run,
                     log_fn=lambda s: None)
    _untouched(run_copy)


def test_a_figure_that_cannot_be_written_is_one_error_and_keeps_the_old_one(tmp_path,
                                                                           monkeypatch):
    import matplotlib.pyplot as plt

    from fmnist_jax.evaluation import plots

    path = tmp_path / "curves.png"
    plots.save_figure(plt.figure(), path)
    assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["curves.png"]
    path.write_bytes(b"the old figure")

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "write_atomically", full_disk)
    fig = plt.figure()
    with pytest.raises(FmnistError, match=rf"^cannot write {path} \(No space left on device\)"):
        plots.save_figure(fig, path)
    assert path.read_bytes() == b"the old figure" and not plt.fignum_exists(fig.number)


def _edit(run_dir, name, text):
    path = run_dir / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)


@pytest.mark.parametrize("name,text,message", [
    (folder.CONFIG_FILE, '{"epochs": "two"}', "epochs must be int"),
    (folder.CONFIG_FILE, '{"clip_norm": [1]}', "clip norm must be float or none"),
    (folder.CONFIG_FILE, '[1, 2]', "not a JSON object"),
    (folder.NORMALIZATION_FILE, '{"mean": "0.5", "std": 0.5}', "needs numbers mean and std"),
    (folder.NORMALIZATION_FILE, '[0.5, 0.5]', "needs numbers mean and std"),
    (folder.NORMALIZATION_FILE, '{"mean": 0.5, "std": 0', "malformed"),
    (folder.HISTORY_FILE, '{"epoch": 1, "train_loss": 0.5}\n{"epoch": 2, "train_lo', "line 2 is malformed"),
    (folder.HISTORY_FILE, '{"epoch": 1, "train_loss": "low"}\n', "line 1 is not an epoch"),
    (folder.CONFIG_FILE, b'\xff\xfe\x00garbage', "config.json is malformed (not UTF-8 text"),
    (folder.NORMALIZATION_FILE, b'{"mean": 0.5, "std": 0.5}\xff',
     "normalization.json is malformed (not UTF-8 text"),
    (folder.HISTORY_FILE, b'{"epoch": 1, "train_loss": 0.5}\n\xff\n',
     "history.jsonl line 2 is malformed (not UTF-8 text"),
])
def test_evaluate_on_an_edited_run_folder_prints_one_line_and_writes_nothing(
        run_copy, name, text, message, run_main):
    _edit(run_copy, name, text)
    # No data dir: the run folder must be checked before any data loads.
    result = run_main("evaluate.py", run_copy, "--data-dir", "/nonexistent")
    assert message in one_error_line(result)
    _untouched(run_copy)


def test_predict_on_a_config_with_wrong_types_prints_one_line(run_copy, tmp_path, run_main):
    _edit(run_copy, folder.CONFIG_FILE, json.dumps({**json.loads(
        (run_copy / folder.CONFIG_FILE).read_text()), "batch_size": 32.5}))
    np.save(tmp_path / "x.npy", make_split(1).images_NxHxWx1)
    assert "batch size must be int" in one_error_line(
        run_main("predict.py", run_copy, tmp_path / "x.npy"))


# --- an interrupted run is continued with --resume; its config stays the one it began with ----

def _interrupted(run_copy):
    """The tiny run as a kill after its last checkpoint leaves it: no best.json."""
    (run_copy / folder.BEST_FILE).unlink()
    return run_copy


@pytest.mark.parametrize("script,args", [
    ("evaluate.py", ["{run}", "--data-dir", "/nonexistent"]),
    ("predict.py", ["{run}", "x.npy"]),
])
def test_evaluate_and_predict_of_an_unfinished_run_name_the_resume(run_copy, script, args,
                                                                   run_main):
    run = _interrupted(run_copy)
    assert one_error_line(run_main(script, *[a.format(run=run) for a in args])) == (
        f"error: {run} holds an unfinished run (checkpoints up to epoch 2): continue it with "
        f"`python scripts/train.py --resume {run}`")
    _untouched(run)


def test_train_on_the_workdir_of_an_unfinished_run_names_the_resume(run_copy, run_main):
    run = _interrupted(run_copy)
    assert one_error_line(run_main("train.py", "--workdir", run, "--data-dir", "/nonexistent")) \
        == (f"error: {run} already holds a run, unfinished (checkpoints up to epoch 2): continue "
            f"it with `python scripts/train.py --resume {run}`, or pass another --workdir")
    held = folder.reopen(run)  # trained now by another process: no advice to resume
    try:
        assert "being trained by another process: pass another --workdir" in one_error_line(
            run_main("train.py", "--workdir", run, "--data-dir", "/nonexistent"))
        assert "is still being trained by another process: wait for it" in one_error_line(
            run_main("evaluate.py", run, "--data-dir", "/nonexistent"))
    finally:
        held.release()


def _edit_config(run_dir, name=folder.CONFIG_FILE, **changes):
    path = run_dir / name
    fields = json.loads(path.read_text())
    config = fields["config"] if name == folder.SEEDS_FILE else fields
    config.update(changes)
    path.write_text(json.dumps(fields, indent=4))  # reformatted too: only values count


def test_resume_refuses_an_edited_config_naming_the_change(run_copy, run_main):
    run = _interrupted(run_copy)
    _edit_config(run)  # the same values, written another way: not an edit
    folder.check_config_unchanged(run)
    _edit_config(run, learning_rate=0.01, model="cnn")
    for flags in ([], ["--learning-rate", "0.001"]):  # checked before the flags are compared
        assert one_error_line(run_main("train.py", "--resume", run, *flags,
                                       "--data-dir", "/nonexistent")) == (
            f"error: {run / folder.CONFIG_FILE} was edited after the run began (model "
            f"\"lenet5\" -> \"cnn\", learning_rate 0.001 -> 0.01): set it back; a resumed run "
            f"keeps its config (start a new run for another)")
    with pytest.raises(FmnistError, match="was edited after the run began"):
        folder.reopen(run)  # the library's resume too


@pytest.mark.slow
def test_a_folder_without_claim_json_still_resumes(run_copy, tmp_path, run_main):
    run = _interrupted(run_copy)
    (run / folder.CLAIM_FILE).unlink()  # as versions before it wrote the folder
    write_csv_split(make_split(512, seed=0), tmp_path / "train.csv")  # the tiny run's data
    write_csv_split(make_split(300, seed=1), tmp_path / "test.csv")
    result = run_main("train.py", "--resume", run, "--train-csv", tmp_path / "train.csv",
                      "--test-csv", tmp_path / "test.csv", "--no-report", "--no-progress")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert folder.finished(run)


# --- data.json: the record of the images a run was trained on -------------------------------

def test_evaluate_refuses_a_run_whose_data_json_is_missing(run_copy, run_main):
    (run_copy / folder.DATA_FILE).unlink()  # as if trained on CSV files: tfds's would differ
    # No data dir: refused before any data loads, the report kept.
    assert one_error_line(run_main("evaluate.py", run_copy, "--data-dir", "/nonexistent")) == (
        f"error: {run_copy / folder.DATA_FILE} is missing: without it the images given cannot be "
        f"checked against those {run_copy} was trained on (CSV files, say): restore it from a "
        f"copy of the run")
    _untouched(run_copy)
    with pytest.raises(FmnistError, match="data.json is missing"):
        folder.reopen(_interrupted(run_copy))


def test_a_run_from_before_data_json_is_evaluated_without_it(run_copy):
    (run_copy / folder.DATA_FILE).unlink()
    (run_copy / folder.CLAIM_FILE).unlink()
    _as_an_earlier_version_wrote_it(run_copy)
    folder.check_data_file(run_copy)
    folder.check_data(run_copy, make_split(4), make_split(4))  # nothing to check against


# --- the folder of a --seeds run, one seed's folder damaged ----------------------------------

@pytest.fixture
def seeds_copy(tiny_run, tmp_path):
    """A finished --seeds 2 run (seeds 4 and 5) made of two copies of the tiny run."""
    cfg = dataclasses.replace(tiny_config(), seeds=2)
    whole = tmp_path / "seeds"
    whole.mkdir()
    (whole / folder.SEEDS_FILE).write_text(json.dumps(
        {"config": json.loads(cfg.to_json()), "runs": ["seed-4", "seed-5"]}))
    for member in cfg.members():
        path = shutil.copytree(tiny_run[0], folder.member_dir(whole, member.seed))
        (path / folder.CONFIG_FILE).write_text(member.to_json())
        (path / folder.CLAIM_FILE).write_text(json.dumps({"config": json.loads(
            member.to_json())}))
    (whole / folder.SUMMARY_FILE).write_text("{}")
    return whole


@pytest.mark.parametrize("script,args", [
    ("evaluate.py", ["{run}", "--data-dir", "/nonexistent"]),
    ("predict.py", ["{run}/seed-5", "x.npy"]),
    ("train.py", ["--resume", "{run}", "--data-dir", "/nonexistent"]),
])
def test_a_missing_seed_folder_is_named_as_part_of_the_seeds_run(seeds_copy, script, args,
                                                                 run_main):
    shutil.rmtree(seeds_copy / "seed-5")
    (seeds_copy / folder.SUMMARY_FILE).unlink()  # unfinished: --resume reads every seed
    assert one_error_line(run_main(script, *[a.format(run=seeds_copy) for a in args])) == (
        f"error: {seeds_copy / 'seed-5'} is missing from the --seeds 2 run {seeds_copy} "
        f"(seeds.json lists it): restore it from a copy of the run")


def test_an_unfinished_seed_names_the_resume_of_the_whole_run(seeds_copy, run_main):
    (seeds_copy / folder.SUMMARY_FILE).unlink()
    _interrupted(seeds_copy / "seed-5")
    assert one_error_line(run_main("evaluate.py", seeds_copy, "--data-dir", "/nonexistent")) == (
        f"error: {seeds_copy / 'seed-5'} holds an unfinished run (checkpoints up to epoch 2): "
        f"continue it with `python scripts/train.py --resume {seeds_copy}`")
    _edit_config(seeds_copy, folder.SEEDS_FILE, batch_size=64)
    assert one_error_line(run_main("train.py", "--resume", seeds_copy, "--data-dir",
                                   "/nonexistent")) == (
        f"error: {seeds_copy / folder.SEEDS_FILE} was edited after the run began (batch_size 32 "
        f"-> 64): set it back; a resumed run keeps its config (start a new run for another)")
