"""``verify()`` and ``load()`` agree on every input.

For every crafted defect of ``fault_injection/badfiles.py`` and for fuzz
inputs from its fuzzer (written into a real checkpoint), either both accept
the checkpoint, or ``verify()`` reports a problem for it and ``load(step=N)``
raises a typed error. Neither ever raises anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import warnings

import pytest
import torch

import ckstore
from ckstore.format.hashing import default_algorithm, hash_bytes
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from fault_injection import badfiles  # noqa: E402

STEP = 5


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("agree-template")
    badfiles._good_store(str(base))
    return base


def _fresh(template, tmp_path) -> str:
    base = tmp_path / "case"
    shutil.copytree(template, base, symlinks=True)
    return str(base / "store")


def _outcomes(root: str) -> tuple[bool, bool, str]:
    """(verify found a problem in step 5, load(step=5) raised a typed error, what happened)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ckstore.Store(root, readonly=True) as store:
            problems = store.verify(STEP) if os.path.isdir(os.path.join(root, badfiles.STEP_DIR)) else [None]
            try:
                store.load(step=STEP)
                loaded, why = False, "loaded"
            except ckstore.CkstoreError as exc:
                loaded, why = True, f"{type(exc).__name__}: {exc}"[:300]
            # Neither must raise anything untyped; the store as a whole stays usable.
            store.verify()
            try:
                store.load()
            except ckstore.CkstoreError:
                pass
    return bool(problems), loaded, why


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("name,mutate,mode", badfiles.CASES, ids=[c[0] for c in badfiles.CASES])
def test_verify_and_load_agree_on_every_crafted_case(template, tmp_path, name, mutate, mode):
    root = _fresh(template, tmp_path)
    mutate(badfiles.Case(root))
    problem, refused, why = _outcomes(root)
    assert problem == refused, f"verify found a problem: {problem}; load(step={STEP}): {why}"
    assert refused, f"{name}: a defective checkpoint was accepted by both"


def _rewrite_manifest(root: str, edit) -> None:
    case = badfiles.Case(root)
    body = case.manifest()
    edit(body)
    case.write_manifest(body)


def test_header_dimensions_must_fit_int64(template, tmp_path):
    """A zero-sized tensor whose other dimension does not fit in int64: both refuse it, typed."""
    for shape in ([0, 1 << 70], [0, 1 << 62, 1 << 62], [1 << 63]):
        root = _fresh(template, tmp_path / str(len(os.listdir(tmp_path))))
        case = badfiles.Case(root)
        name = badfiles._first(case)
        header, body = case.header(name)
        header["empty"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(body), len(body)]}
        case.replace_header(name, header)
        problem, refused, why = _outcomes(root)
        assert problem and refused, (shape, why)


def test_unlisted_files_are_refused_by_load_too(template, tmp_path):
    root = _fresh(template, tmp_path)
    os.symlink("/etc/passwd", os.path.join(root, badfiles.STEP_DIR, "passwd"))
    problem, refused, why = _outcomes(root)
    assert problem and refused and "passwd" in why


# ---------------------------------------------------------------- fuzz inputs


def _install_manifest(root: str, data: bytes) -> None:
    with open(os.path.join(root, badfiles.STEP_DIR, "manifest.json"), "wb") as fh:
        fh.write(data)


def _install_tensor_file(root: str, name: str, data: bytes) -> None:
    case = badfiles.Case(root)
    case.replace_file(name, data)


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("kind", ["manifest", "tensor"])
def test_verify_and_load_agree_on_fuzz_inputs(tmp_path, kind):
    fuzzer = badfiles._Fuzzer(str(tmp_path / "fuzz"), seed=20261202 + (kind == "tensor"))
    base = tmp_path / "fuzz" / "fuzz-seed" / "store"
    # The fuzzer's store has its checkpoint at step 1; move it to step 5 so badfiles' paths apply.
    os.rename(base / "checkpoints" / "step-00000001", base / "checkpoints" / f"step-{STEP:08d}")
    manifest = json.loads(fuzzer.manifest)
    manifest["step"] = STEP
    fuzzer.manifest_json = {k: v for k, v in manifest.items() if k != "checksum"}
    body = dict(fuzzer.manifest_json)
    body["checksum"] = str(hash_bytes(badfiles._canon(body), default_algorithm()))
    fuzzer.manifest = badfiles._canon(body)
    _install_manifest(str(base), fuzzer.manifest)
    pristine = tmp_path / "pristine"
    shutil.copytree(base.parent, pristine, symlinks=True)
    names = sorted(fuzzer.files)
    disagreements = []
    accepted = 0
    for i in range(300):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work, symlinks=True)
        root = str(work / "store")
        if kind == "manifest":
            data = fuzzer.manifest_input()
            _install_manifest(root, data)
        else:
            name = names[i % len(names)]
            fuzzer.tensor_pool = [fuzzer.files[name]]  # mutate the file it replaces, so its keys can still match
            data = fuzzer.tensor_input()
            _install_tensor_file(root, name, data)
        problem, refused, why = _outcomes(root)
        accepted += not refused
        if problem != refused:
            disagreements.append(f"input {i} {data[:60]!r}: verify problem={problem}, load: {why}")
    assert not disagreements, disagreements[:5]
    assert accepted  # some mutated inputs stay valid: the comparison is not one-sided
