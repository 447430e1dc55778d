"""API hygiene: the public names, the exception tree, and source rules checked by reading the code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import ckstore
from ckstore import errors as _errors

PACKAGE = Path(ckstore.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))  # every subpackage too: a rule break in storage/ or integrations/ counts


def _rel(module: Path) -> str:
    return module.relative_to(PACKAGE).as_posix()

# Which modules may write to the disk is checked by tests/test_architecture.py (one writer: storage/).
PICKLE_CALLS = {("torch", "save"), ("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "dump"), ("pickle", "dumps"),
                ("numpy", "load"), ("np", "load")}


def _calls(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module alias, attribute, line) for every ``x.y(...)`` call and every ``from x import y`` of interest."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found.append((node.value.id, node.attr, node.lineno))  # also catches references like fn = os.replace
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil", "torch", "pickle", "numpy"):
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
    return found


def test_all_is_sorted_and_complete():
    assert ckstore.__all__ == sorted(ckstore.__all__)
    assert len(set(ckstore.__all__)) == len(ckstore.__all__)
    for name in ckstore.__all__:
        assert hasattr(ckstore, name), name
    public = {name for name, value in vars(ckstore).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert public <= set(ckstore.__all__) | {"annotations"}, public - set(ckstore.__all__)


def test_contract_names_exist():
    for name in ("Store", "CheckpointInfo", "CkstoreError", "IntegrityError", "CheckpointNotFoundError", "CheckpointExistsError",
                 "ManifestError", "StoreLockedError"):
        assert name in ckstore.__all__
    for method in ("save", "load", "checkpoints", "latest", "best", "verify", "tag", "untag", "delete", "close", "__enter__", "__exit__"):
        assert callable(getattr(ckstore.Store, method)), method
    fields = set(ckstore.CheckpointInfo.__dataclass_fields__)
    assert {"step", "metrics", "tags", "path", "created", "nbytes"} <= fields
    signature = inspect.signature(ckstore.Store)
    for option in ("keep_last", "keep_best", "metric", "mode", "keep_every", "readonly"):
        assert signature.parameters[option].kind is inspect.Parameter.KEYWORD_ONLY


def test_every_exception_is_a_ckstore_error():
    exceptions = [value for value in vars(_errors).values() if isinstance(value, type) and issubclass(value, BaseException)]
    assert len(exceptions) >= 10
    for exc in exceptions:
        assert issubclass(exc, ckstore.CkstoreError), exc
        if not exc.__name__.startswith("_"):
            assert exc.__name__ in ckstore.__all__, f"{exc.__name__} is not exported"
    for name in ckstore.__all__:
        value = getattr(ckstore, name)
        if isinstance(value, type) and issubclass(value, BaseException) and not issubclass(value, Warning):
            assert issubclass(value, ckstore.CkstoreError), name
    assert issubclass(ckstore.CheckpointNotFoundError, LookupError)
    assert issubclass(ckstore.CheckpointExistsError, FileExistsError)
    assert issubclass(ckstore.StoreLockedError, TimeoutError)
    assert issubclass(ckstore.StorageError, OSError)
    assert issubclass(ckstore.CorruptCheckpointWarning, UserWarning)


def test_exceptions_carry_their_details():
    err = ckstore.IntegrityError("m", path="/p", expected="a", actual="b")
    assert (err.path, err.expected, err.actual) == ("/p", "a", "b")
    import pickle  # only to check that errors survive a process boundary (multiprocessing pickles them)

    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.expected, again.actual, str(again)) == ("/p", "a", "b", "m")
    locked = ckstore.StoreLockedError("m", path="/s", pid=12, host="h")
    assert (locked.pid, locked.host) == (12, "h")
    storage = ckstore.StorageError("disk full", errno=28, path="/x")
    assert storage.errno == 28 and storage.filename == "/x" and str(storage) == "disk full"


#: Reads other programs' checkpoint files (torch.save, DCP), never a store: it unpickles with
#: weights_only=True or an allow-listed unpickler (its docstring says what); a store never holds pickle.
#: distributed/dcp.py: checkpoints written before non-tensor values were JSON (DCP metadata format 1) hold DCP's
#: torch.save bytes for them (an optimizer's param_groups), which DCP's planner unpickles itself on load; ckstore
#: first checks that each loads under torch.load(weights_only=True). New saves write JSON (distributed/values.py).
FOREIGN_READERS = {"integrations/importers.py", "distributed/dcp.py"}


@pytest.mark.guarantee("G16")
@pytest.mark.parametrize("module", [m for m in MODULES if _rel(m) not in FOREIGN_READERS], ids=_rel)
def test_no_pickle(module):
    tree = ast.parse(module.read_text(), filename=str(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for alias in node.names), f"{_rel(module)}:{node.lineno}"
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("pickle", "cPickle", "dill", "cloudpickle", "joblib"), f"{_rel(module)}:{node.lineno}"
    offending = [f"{_rel(module)}:{line} {mod}.{attr}" for mod, attr, line in _calls(tree) if (mod, attr) in PICKLE_CALLS]
    assert offending == []


def test_the_scan_catches_what_it_looks_for():
    """The AST scans above must be able to fail."""
    bad = ast.parse("import torch, pickle\ntorch.save({}, 'x')\nfrom pickle import loads\n")
    found = {(m, a) for m, a, _ in _calls(bad)}
    assert ("torch", "save") in found and ("pickle", "loads") in found


def test_version():
    assert isinstance(ckstore.__version__, str) and ckstore.__version__.count(".") >= 2
