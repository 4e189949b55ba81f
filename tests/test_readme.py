"""The README's layout table lists every module of the package, and names none that is gone; the docs
are references, with no tracker issue numbers a reader without the tracker cannot follow."""

import re
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit


def tracked(pattern: str) -> set[str]:
    return set(subprocess.run(["git", "ls-files", pattern], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.split())


def test_the_layout_table_lists_every_module_and_no_other():
    readme = (REPO / "README.md").read_text()
    rows = set(re.findall(r"^\| `(horovod_mlstm/[^`]+\.py)` \|", readme, re.MULTILINE))
    modules = tracked("horovod_mlstm/*.py")
    assert modules, "not a git checkout"
    assert modules - rows == set(), "modules without a row in README.md's layout table"
    assert rows - modules == set(), "rows in README.md's layout table for modules that do not exist"


def test_docs_name_no_tracker_issues():
    for path in sorted(tracked("*.md")):
        text = (REPO / path).read_text()
        assert not re.search(r"\b[Ii]ssues? \d+", text), f"{path} names a tracker issue"
