"""A pytest plugin that counts, after every test, the compile cache entries of the tests' own
HOME that have no access-time file (what makes jax's size-capped cache stop writing):

    python -m pytest -p benchmarks.orphan_probe -n 0 tests/test_loop.py tests/test_parallel.py

One line per test, `node id <TAB> entries <TAB> entries without -atime`, in the file
$ORPHAN_LOG (default orphans.tsv). Run with -n 0 so that each count follows one test.
"""

import os
from pathlib import Path


def _count() -> tuple[int, int]:
    cache = Path(os.environ["HOME"]) / ".cache/fmnist_jax/xla"
    entries = list(cache.glob("*-cache")) if cache.is_dir() else []
    orphans = [e for e in entries
               if not e.with_name(e.name.removesuffix("-cache") + "-atime").exists()]
    return len(entries), len(orphans)


def pytest_runtest_teardown(item, nextitem):
    entries, orphans = _count()
    with Path(os.environ.get("ORPHAN_LOG", "orphans.tsv")).open("a") as log:
        log.write(f"{item.nodeid}\t{entries}\t{orphans}\n")
