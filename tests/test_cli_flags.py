"""cli_flags.py: the command-line flags made from TrainConfig's fields."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_jax import cli, cli_flags
from fmnist_jax.cli import train_parser
from fmnist_jax.cli_flags import config_from_args
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.presets import PRESETS
from tests.helpers import REPO, needs


def test_every_config_field_has_a_flag_with_its_default_and_help():
    help_text = " ".join(train_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        default = getattr(PRESETS["lenet5"].config, field.name)
        words = " ".join(field.metadata["help"].split())
        shown = 'none' if default in (None, '') else default  # --sweep's empty grid: none
        assert f"{words} (default {shown})" in help_text, flag


@pytest.mark.parametrize("parser", [cli.train_parser, cli.evaluate_parser, cli.compare_parser,
                                    cli.predict_parser, cli.export_parser, cli.bench_parser])
def test_every_help_text_shows_a_percent_sign_once(parser):
    # argparse formats `help` strings with % but prints a parser's description and epilog as
    # they are: each text needs "%%" in one place and "%" in the other.
    help_text = parser().format_help()
    assert "%%" not in help_text


def test_flags_override_only_what_is_given():
    args = train_parser().parse_args(["--preset", "cnn", "--epochs", "3", "--clip-norm", "none"])
    assert config_from_args(args) == dataclasses.replace(PRESETS["cnn"].config, epochs=3)
    args = train_parser().parse_args(["--clip-norm", "2.5", "--model", "cnn"])
    cfg = config_from_args(args)
    assert (cfg.clip_norm, cfg.model, cfg.batch_size) == (2.5, "cnn", 64)


def test_teacher_none_is_no_teacher_as_its_help_says():
    assert "none: no teacher" in " ".join(train_parser().format_help().split())
    for value in ("none", "None"):
        args = train_parser().parse_args(["--teacher", value])
        assert config_from_args(args) == PRESETS["lenet5"].config
    args = train_parser().parse_args(["--teacher", "./none"])  # a folder named none
    assert config_from_args(args).teacher == "./none"


def test_help_of_workdir_and_cpu_devices_covers_a_sweep():
    # Compared without whitespace: argparse may wrap a line at a name's hyphen.
    help_text = "".join(train_parser().format_help().split())
    for words in ("with --sweep, runs/PRESET-sweep-seedN-TIMESTAMP-PID",
                  "POINT/seed-S per grid point and seed", "with --seeds K or --sweep one per core"):
        assert "".join(words.split()) in help_text, words


# --- the compile cache and the user's files -------------------------------------------------

@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_compile_cache_is_refused_not_read_as_the_default(value, monkeypatch):
    monkeypatch.setenv(cli_flags.COMPILE_CACHE_ENV, "none")  # what an empty value fell back to
    with pytest.raises(cli_flags.FmnistError, match="--compile-cache needs a folder, or none "
                       "for no cache, got an empty value"):
        cli_flags.use_compile_cache(value)
    assert cli_flags.use_compile_cache(None) is None  # not given: the variable's choice


def test_processes_a_test_starts_keep_out_of_the_users_home():
    """conftest gives the session a HOME of its own: a process a test starts resolves the
    compile cache (and every other per-user folder) inside it, never in the user's."""
    from tests.conftest import TEST_HOME_ENV, USER_HOME_ENV

    code = ("from pathlib import Path; from fmnist_jax.cli_flags import DEFAULT_COMPILE_CACHE; "
            "print(Path(DEFAULT_COMPILE_CACHE).expanduser())")
    cache = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip())
    assert cache.is_relative_to(os.environ[TEST_HOME_ENV])
    user_home = os.environ[USER_HOME_ENV]
    assert not user_home or not cache.is_relative_to(user_home)


@needs("filelock")
def test_an_entry_without_access_time_no_longer_stops_jax_caching(tmp_path):
    """jax's size-limited cache reads every entry's -atime before a write: an entry without
    one made every later write fail (jax issue 39880). After the repair, jax writes again."""
    from jax._src.lru_cache import LRUCache

    (tmp_path / "orphan-cache").write_bytes(b"x" * 10)  # as a kill between jax's two writes
    cli_flags.give_cache_entries_an_access_time(tmp_path)
    assert (tmp_path / "orphan-atime").is_file()
    LRUCache(str(tmp_path), max_size=1 << 20).put("fresh", b"y" * 10)
    assert (tmp_path / "fresh-cache").read_bytes() == b"y" * 10


# --- sizes checked before anything is allocated ----------------------------------------------

@pytest.mark.slow
def test_too_many_cpu_devices_are_refused_before_jax_starts(tmp_path):
    """100,000 CPU devices took 4 GB as jax started them, before any check: now the count is
    refused first (also from $FMNIST_CPU_DEVICES), and no run folder is made. One child
    process runs train.py's main twice, with the flag, then with the variable."""
    code = ("import os, sys\n"
            "from jax._src import xla_bridge\n"
            "from fmnist_jax.cli import train_main\n"
            "for argv, variable in ([['--cpu-devices', '100000'], None], [[], '100000']):\n"
            "    if variable:\n        os.environ['FMNIST_CPU_DEVICES'] = variable\n"
            "    try:\n        train_main(argv + ['--workdir', sys.argv[1]])\n"
            "    except SystemExit:\n        pass\n"
            "    print(xla_bridge.backends_are_initialized())\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    cores, most = len(os.sched_getaffinity(0)), max(256, os.cpu_count())
    assert result.stderr.strip().splitlines() == [
        f"error: {flag} 100000 is more than {most}, the most the CPU is split "
        f"into (devices beyond its {cores} cores only emulate a mesh, and each takes memory "
        f"as jax starts): pass at most {most} ({cores}, one per core, trains "
        f"fastest)" for flag in ("--cpu-devices", "$FMNIST_CPU_DEVICES")], result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]  # jax never started its devices
    assert not (tmp_path / "run").exists()
