"""train.py's own options (data flags, --no-report, --calibration), recorded as a run begins
and taken back by --resume and evaluate.py for the flags not given (fmnist_jax/cli_resume.py),
and the stop of a run by Ctrl-C or SIGTERM, which names what continues it."""

import argparse
import json
import shutil

import pytest

from fmnist_jax import FmnistError, cli_resume
from fmnist_jax.cli_resume import DEFAULT_DATA_FLAGS, command_options, take_recorded_options
from fmnist_jax.data import write_csv_split
from fmnist_jax.run import folder, interrupts
from fmnist_jax.run.folder_config import recorded_options
from fmnist_jax.run.presets import get_config
from tests.helpers import make_split, one_error_line, tiny_config

RECORD = {"calibration": "vector", "report": False, "data_dir": None,
          "manual_dir": "/data/fmnist", "data_source": "idx", "train_csv": None,
          "test_csv": None}


@pytest.fixture
def record(tmp_path):
    """RECORD, its --manual-dir a folder that exists."""
    (tmp_path / "fmnist").mkdir()
    return {**RECORD, "manual_dir": str(tmp_path / "fmnist")}


def _args(**given) -> argparse.Namespace:
    """train.py's options as its parser leaves them when none is given."""
    return argparse.Namespace(**{"calibration": None, "report": None, **DEFAULT_DATA_FLAGS,
                                 **given})


def _claimed(path, cfg, options):
    run = folder.claim(path, cfg, options)
    run.release()
    return path


def test_a_run_and_each_of_its_seeds_record_the_options(tmp_path):
    one = _claimed(tmp_path / "one", tiny_config(), RECORD)
    assert recorded_options(one) == RECORD
    many = _claimed(tmp_path / "many", get_config(seeds=2, seed=4, epochs=2), RECORD)
    assert recorded_options(many) == RECORD  # seeds.json
    assert recorded_options(many / "seed-5") == RECORD  # a seed resumed on its own
    assert recorded_options(_claimed(tmp_path / "api", tiny_config(), None)) is None


def test_the_options_not_given_are_the_records_and_the_given_ones_win(tmp_path, capsys,
                                                                      record):
    run = _claimed(tmp_path / "run", tiny_config(), record)
    args = _args()
    assert take_recorded_options(args, run) == (
        f"note: reading the data {run} began with (--manual-dir {record['manual_dir']} "
        f"--data-source idx); pass data flags for other files")
    assert (args.calibration, args.report, args.manual_dir, args.data_source) == (
        "vector", False, record["manual_dir"], "idx")
    # One data flag given: the data is the flags', none taken from the record.
    args = _args(calibration="dirichlet", report=True, train_csv="a.csv", test_csv="b.csv")
    assert take_recorded_options(args, run) is None
    assert (args.calibration, args.report, args.manual_dir, args.data_source) == (
        "dirichlet", True, None, "auto")
    evaluate_args = _args()
    del evaluate_args.report  # evaluate.py has none
    take_recorded_options(evaluate_args, run)
    assert evaluate_args.calibration == "vector" and not hasattr(evaluate_args, "report")
    assert capsys.readouterr().err == ""  # nothing printed: the command prints the note
    shutil.rmtree(record["manual_dir"])  # moved since: the record's flags name the fix
    with pytest.raises(FmnistError, match=f"{run} began with the data flags --manual-dir "
                                          f"{record['manual_dir']} --data-source idx "
                                          f"\\(claim.json\\), and {record['manual_dir']} is "
                                          f"gone: pass the data flags for where the same "
                                          f"files are now"):
        take_recorded_options(_args(), run)


def test_without_a_record_the_defaults_hold(tmp_path):
    args = _args()
    take_recorded_options(args, _claimed(tmp_path / "old", tiny_config(), None))
    assert (args.calibration, args.report) == ("temperature", True)
    assert {flag: getattr(args, flag) for flag in DEFAULT_DATA_FLAGS} == DEFAULT_DATA_FLAGS


@pytest.mark.parametrize("options", [{**RECORD, "report": "yes"}, {**RECORD, "manual_dir": 3},
                                     [1, 2], {**RECORD, "calibration": "platt"},
                                     {**RECORD, "data_source": "bogus"}])
def test_a_damaged_record_is_one_line(tmp_path, options):
    run = _claimed(tmp_path / "run", tiny_config(), RECORD)
    record = json.loads((run / folder.CLAIM_FILE).read_text())
    (run / folder.CLAIM_FILE).write_text(json.dumps({**record, "options": options}))
    with pytest.raises(FmnistError, match=f"{run}(/claim.json is malformed| records the)"):
        take_recorded_options(_args(), run)


def test_the_recorded_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = command_options(_args(calibration="vector", report=True,
                                    train_csv="data/train.csv", test_csv="~/test.csv"))
    assert options["train_csv"] == str(tmp_path / "data" / "train.csv")
    assert not options["test_csv"].startswith("~") and options["report"] is True


def test_a_resume_keeps_the_runs_no_report_against_a_calibration_given(tmp_path, run_main,
                                                                        record):
    run = _claimed(tmp_path / "run", tiny_config(), {**record, "calibration": "temperature"})
    assert one_error_line(run_main("train.py", "--resume", run, "--calibration", "vector")) == (
        "error: --calibration vector is the report's map, and the run was begun with "
        "--no-report, which its resume keeps: pass --report as well, or drop --calibration "
        "(evaluate.py --calibration vector fits it later)")
    assert one_error_line(run_main("train.py", "--calibration", "vector", "--no-report")) == (
        "error: --calibration vector is the report's map, and --no-report writes no report: "
        "drop one of them (evaluate.py --calibration vector fits it later)")


@pytest.mark.parametrize("given", [["--no-report"], ["--report", "--calibration", "vector"]])
def test_a_finished_run_resumed_with_report_flags_exits_0(run_copy, run_main, given, record):
    """A retry loop can always call the resume: --no-report with the run's recorded map, or
    --report with a map against its recorded --no-report, are no contradiction."""
    claim = json.loads((run_copy / folder.CLAIM_FILE).read_text())
    (run_copy / folder.CLAIM_FILE).write_text(json.dumps({**claim, "options": record}))
    result = run_main("train.py", "--resume", run_copy, *given)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{run_copy} has already finished training")


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run[0], tmp_path / "run")


def test_a_resume_of_the_whole_run_reads_its_data_and_reports_only_the_seeds_without_one(
        tiny_run, tmp_path, run_main, monkeypatch):
    """A seed resumed and reported on its own (seed-4), one still unfinished (seed-5), one
    reported with another map (seed-6): the resume of the whole folder, given no flag, reads
    the CSV files and uses the map the run began with, and evaluates seed-5 and seed-6 alone,
    so that the summary over the seeds is of one map. Training and evaluation are stood in for: what is
    checked is what train.py hands them."""
    for name, split in (("train", make_split(512, seed=0)), ("test", make_split(300, seed=1))):
        write_csv_split(split, tmp_path / f"{name}.csv")
    options = {**RECORD, "report": True, "manual_dir": None, "data_source": "auto",
               "train_csv": str(tmp_path / "train.csv"), "test_csv": str(tmp_path / "test.csv")}
    cfg = get_config(epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.1, seeds=3,
                     seed=4)
    many = _claimed(tmp_path / "many", cfg, options)
    for seed in (4, 5, 6):
        shutil.copy(tiny_run[0] / folder.HISTORY_FILE, many / f"seed-{seed}")
    for seed, kind in ((4, "vector"), (6, "dirichlet")):  # seed 6 resumed with another map
        shutil.copy(tiny_run[0] / folder.BEST_FILE, many / f"seed-{seed}")
        (many / f"seed-{seed}" / folder.REPORT_JSON_FILE).write_text(json.dumps(
            {"calibration": {"map": {"kind": kind}}}))

    from fmnist_jax.evaluation import over_seeds, report
    from fmnist_jax.run import loop

    def finish(cfg, run, *, train, test, **kwargs):
        for member in run.members:
            shutil.copy(tiny_run[0] / folder.BEST_FILE, member.path)
        return None, []

    evaluated = []
    monkeypatch.setattr(loop, "train_and_evaluate", finish)
    monkeypatch.setattr(report, "evaluate_run", lambda path, *, train, test, calibration:
                        evaluated.append((path, calibration, len(train), len(test))))
    monkeypatch.setattr(over_seeds, "write_summary", lambda path: None)
    result = run_main("train.py", "--resume", many, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert evaluated == [(many / f"seed-{seed}", "vector", 512, 300) for seed in (5, 6)]
    assert f"note: reading the data {many} began with (--train-csv " in result.stderr


class _Run:
    """What `cli_resume.continue_hint` reads of a claim."""

    def __init__(self, path, resumed=False):
        self.path, self.resumed, self.members = path, resumed, ()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, interrupts.Terminated])
def test_an_interrupt_names_what_continues_the_run_once_it_holds_an_epoch(tmp_path, interrupt):
    run = _Run(tmp_path)
    with pytest.raises(interrupt) as raised:  # before the first epoch: given back, no hint
        with cli_resume.continue_hint(run, "temperature", "train"):
            raise interrupt
    assert str(raised.value) == ""
    (tmp_path / folder.HISTORY_FILE).write_text("")
    with pytest.raises(interrupt, match=f"continue with `python scripts/train.py --resume "
                                        f"{tmp_path}`"):
        with cli_resume.continue_hint(run, "temperature", "train"):
            raise interrupt
    with pytest.raises(interrupt, match=f"python scripts/evaluate.py {tmp_path} --calibration "
                                        f"vector"):
        with cli_resume.continue_hint(run, "vector", "report"):
            raise interrupt

