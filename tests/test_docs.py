"""The README and docs/ stay true: every relative link reaches a file and a heading, every
command they show uses flags (and choices) its script knows, and the README's example of the
pure steps runs as printed."""

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_jax.run.presets import PRESETS
from tests.helpers import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+ (.+)$", re.MULTILINE)
# A command, up to the end of its code span, line, table cell or shell comment.
COMMAND = re.compile(r"python (?:-m )?(scripts/\w+\.py|benchmarks\.\w+)([^`\n|#;&]*)")
FLAG_AND_VALUE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:[ =]([^\s\]\[-][^\s\]\[]*))?")


def _docs() -> dict[str, str]:
    """The newcomer's pages, and BENCHMARKS.md's table of current numbers (its history keeps
    commands as they were run)."""
    pages = {"README.md": (REPO / "README.md").read_text()}
    pages |= {f"docs/{p.name}": p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    pages["BENCHMARKS.md"] = benchmarks.split("## History")[0]
    return pages


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_follows_github():
    assert _slug("CPU or GPU: `--device`") == "cpu-or-gpu---device"
    assert _slug("Over the seeds, and two runs compared") == "over-the-seeds-and-two-runs-compared"


def test_every_relative_link_reaches_a_file_and_its_heading():
    broken = []
    for page in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in {
                    _slug(h) for h in HEADING.findall(linked.read_text())}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


class _Parsed(BaseException):
    """Carries a benchmark's parser out of its main() before anything runs."""

    def __init__(self, parser):
        self.parser = parser


def _parser(target: str, monkeypatch) -> argparse.ArgumentParser:
    if target.startswith("scripts/"):
        from fmnist_jax import cli

        return getattr(cli, f"{Path(target).stem}_parser")()

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    module = importlib.import_module(target)
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        patch.setattr(sys, "argv", [target])
        try:
            module.main()
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{target}.main() parsed no arguments")


def _wrong_flags(pages: dict[str, str], monkeypatch) -> tuple[list[str], int, set[str]]:
    """(what is wrong, flags seen, scripts seen) in the commands the `pages` show."""
    monkeypatch.syspath_prepend(str(REPO))
    actions: dict[str, dict[str, argparse.Action]] = {}
    wrong, seen = [], 0
    for page, text in pages.items():
        for target, rest in COMMAND.findall(text):
            if target not in actions:
                actions[target] = {o: a for a in _parser(target, monkeypatch)._actions
                                   for o in a.option_strings}
            for flag, value in FLAG_AND_VALUE.findall(rest):
                seen += 1
                action = actions[target].get(flag)
                if action is None:
                    wrong.append(f"{page}: {target} has no {flag}")
                    continue
                # --preset and the config's own choices (shown as the metavar {a,b}) are
                # checked by the config, for its message, not by argparse.
                choices = PRESETS if flag == "--preset" else action.choices
                if choices is None and str(action.metavar).startswith("{"):
                    choices = str(action.metavar).strip("{}").split(",")
                if choices and value and value.islower() and value not in choices:
                    wrong.append(f"{page}: {target} {flag} {value}: not one of {list(choices)}")
    return wrong, seen, set(actions)


def test_every_command_in_the_docs_uses_flags_and_choices_its_script_knows(monkeypatch):
    wrong, seen, targets = _wrong_flags(_docs(), monkeypatch)
    assert seen > 100, "the pattern no longer finds the docs' commands"
    assert {"scripts/train.py", "benchmarks.gpu_check"} <= targets
    assert wrong == []


def test_a_made_up_flag_preset_or_choice_is_caught(monkeypatch):
    page = ("`python scripts/train.py --preset lenet6 --no-report --epochz 3 --model cnn2`\n"
            "`python -m benchmarks.time_seeds --seeds-list 1,8 --no-such-flag`")
    wrong, seen, _ = _wrong_flags({"page": page}, monkeypatch)
    assert seen == 6
    assert [w.split(": ", 1)[1].split(":")[0] for w in wrong] == [
        "scripts/train.py --preset lenet6", "scripts/train.py has no --epochz",
        "scripts/train.py --model cnn2", "benchmarks.time_seeds has no --no-such-flag"]


@pytest.mark.slow
def test_the_readme_example_of_the_pure_steps_runs(manual_dir, prepared_data_dir, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    example = next(b for b in blocks if "from fmnist_jax.steps import" in b)
    env = {**os.environ, "FMNIST_MANUAL_DIR": str(manual_dir),
           "FMNIST_DATA_DIR": str(prepared_data_dir)}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = re.search(r"^test accuracy (0\.\d{4})$", result.stdout, re.MULTILINE)
    assert printed, result.stdout
    accuracy = float(printed.group(1))
    assert accuracy > 0.8  # one epoch of LeNet-5 with Adam: about 0.85
