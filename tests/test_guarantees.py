"""Every guarantee of docs/guarantees.md is exercised by a test that names it, and every ID a test names is documented.

Tests name guarantees with ``@pytest.mark.guarantee("G3", ...)``. The marks are read the way pytest sees them: a
subprocess collects the suite (``pytest --collect-only -m guarantee``) with a small plugin that records each
item's marks, so a mark on a parametrized case, a class or a module counts exactly as pytest applies it. Without
this check an ID could lose its last test in a refactor (a guarantee nobody checks any more), or a test could cite
an ID the docs renumbered (a claim that points nowhere).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping

from conftest import REPO_ROOT

GUARANTEES = REPO_ROOT / "docs" / "guarantees.md"
_HEADING = re.compile(r"^### (G[0-9]+): \S", re.MULTILINE)
_ID = re.compile(r"\AG[1-9][0-9]*\Z")

# Runs in a subprocess: collects the suite and prints, as JSON, each collected item's guarantee marks.
_COLLECT = r"""
import json, sys
import pytest

class Marks:
    def __init__(self):
        self.items = []

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers("guarantee"):
                self.items.append({"nodeid": item.nodeid, "args": [repr(a) if not isinstance(a, str) else a for a in mark.args],
                                   "kwargs": sorted(mark.kwargs)})

marks = Marks()
code = pytest.main(["--collect-only", "-q", "-m", "guarantee", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[marks])
print("\n@@marks@@" + json.dumps({"exit": int(code), "items": marks.items}))
"""


def documented_ids(text: str) -> list[str]:
    """The IDs of the ``### G<n>: statement`` headings, in order; duplicates are kept so they can be refused."""
    return _HEADING.findall(text)


def collected_marks(*paths: str) -> list[dict]:
    """Each collected test's guarantee marks: ``{"nodeid", "args", "kwargs"}``; fails on a collection error."""
    proc = subprocess.run(
        [sys.executable, "-c", _COLLECT, *(paths or ("tests",))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    head, sep, payload = proc.stdout.rpartition("\n@@marks@@")
    assert sep, f"the collection printed no marks (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(payload)
    # 0: collected; 5: nothing matched -m guarantee (the check below then reports every ID as unexercised).
    assert result["exit"] in (0, 5), f"collecting the suite failed (exit {result['exit']}):\n{head[-3000:]}\n{proc.stderr[-3000:]}"
    return result["items"]


def problems(documented: Iterable[str], marks: Iterable[Mapping]) -> list[str]:
    """What is wrong between the documented IDs and the tests' marks; an empty list when they agree."""
    documented = list(documented)
    out = [f"{gid} is documented twice in docs/guarantees.md" for gid in sorted({g for g in documented if documented.count(g) > 1})]
    if not documented:
        out.append("docs/guarantees.md documents no guarantee (no '### G<n>: ...' heading)")
    exercised: dict[str, list[str]] = {}
    for mark in marks:
        if mark["kwargs"] or not mark["args"]:
            out.append(f"{mark['nodeid']}: guarantee() takes one or more IDs and nothing else, got {mark['args']} {mark['kwargs']}")
        for gid in mark["args"]:
            if not _ID.match(gid):
                out.append(f"{mark['nodeid']}: {gid!r} is not a guarantee ID (G1, G2, ...)")
            elif gid not in documented:
                out.append(f"{mark['nodeid']}: names {gid}, which docs/guarantees.md does not document")
            else:
                exercised.setdefault(gid, []).append(mark["nodeid"])
    out += [f"{gid} is exercised by no test (mark one with @pytest.mark.guarantee({gid!r}))" for gid in dict.fromkeys(documented) if gid not in exercised]
    return out


def test_problems_finds_an_unexercised_id_an_unknown_id_and_a_malformed_mark():
    """The check itself: each kind of disagreement is reported (an unmarked ID would otherwise pass unnoticed)."""
    marks = [
        {"nodeid": "t.py::a", "args": ["G1"], "kwargs": []},
        {"nodeid": "t.py::b", "args": ["G1", "G7"], "kwargs": []},
        {"nodeid": "t.py::c", "args": ["g2"], "kwargs": []},
        {"nodeid": "t.py::d", "args": [], "kwargs": ["id"]},
    ]
    found = problems(["G1", "G2", "G3", "G3"], marks)
    assert "G2 is exercised by no test (mark one with @pytest.mark.guarantee('G2'))" in found
    assert "G3 is documented twice in docs/guarantees.md" in found
    assert "t.py::b: names G7, which docs/guarantees.md does not document" in found
    assert "t.py::c: 'g2' is not a guarantee ID (G1, G2, ...)" in found
    assert any(p.startswith("t.py::d: guarantee() takes one or more IDs") for p in found)
    assert not any(p.startswith("G1 ") for p in found)
    assert problems(["G1"], marks[:1]) == []
    assert problems([], []) == ["docs/guarantees.md documents no guarantee (no '### G<n>: ...' heading)"]


def test_documented_ids_reads_only_guarantee_headings():
    text = "# T\n### G1: durable\ntext G9 in prose\n## Commit protocol\n### G12: one writer\n#### G4: not a guarantee heading\n"
    assert documented_ids(text) == ["G1", "G12"]


def test_collected_marks_see_what_pytest_applies(tmp_path):
    """Marks on a function, on one parametrized case and on a class reach the check; unmarked tests do not."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.guarantee('G1', 'G2')\n"
        "def test_a():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [1, pytest.param(2, marks=pytest.mark.guarantee('G3'))])\n"
        "def test_b(x):\n    pass\n\n"
        "@pytest.mark.guarantee('G4')\n"
        "class TestC:\n    def test_c(self):\n        pass\n\n"
        "def test_unmarked():\n    pass\n"
    )
    marks = collected_marks("--rootdir", str(tmp_path), "-c", str(REPO_ROOT / "pyproject.toml"), str(tmp_path))
    seen = sorted((m["nodeid"].split("::", 1)[1], tuple(m["args"])) for m in marks)
    assert seen == [("TestC::test_c", ("G4",)), ("test_a", ("G1", "G2")), ("test_b[2]", ("G3",))]


def test_every_documented_guarantee_is_exercised_and_every_named_one_documented():
    ids = documented_ids(GUARANTEES.read_text())
    found = problems(ids, collected_marks())
    assert not found, "\n".join(found)
