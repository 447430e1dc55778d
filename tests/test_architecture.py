"""The package's shape, checked by reading the code: one writer of the disk, and imports that point one way.

* Only ``ckstore/storage/`` creates, writes, renames, links, unlinks, makes
  directories or fsyncs. Every other module asks ``storage`` to, so the
  fault-injection harness sees (and can fail, or kill the process at) every
  operation that changes the disk, and the ordering rules (a rename is durable
  only once its directory is fsynced) live in one place. A write made anywhere
  else is invisible to the crash model: it could lose data and no tier would
  notice.
* The folders form layers (:data:`LAYERS`), and a module imports only from its
  own layer or below, function-level imports included: a cycle hidden behind a
  lazy import is still a cycle.

Both scans test themselves on planted violations, so a scan that sees nothing
cannot pass for a clean package.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import ckstore

PACKAGE = Path(ckstore.__file__).parent


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _rel(module: Path, root: Path = PACKAGE) -> str:
    return module.relative_to(root).as_posix()


# ---------------------------------------------------------------- one writer of the disk

#: ``os`` functions that change the disk (or make a change durable).
OS_WRITERS = frozenset({
    "mkdir", "makedirs", "rename", "renames", "replace", "link", "symlink", "unlink", "remove", "rmdir", "removedirs",
    "fsync", "fdatasync", "sync", "ftruncate", "truncate", "write", "pwrite", "writev", "pwritev", "mkfifo", "mknod",
    "chmod", "fchmod", "chown", "fchown", "lchown", "utime", "copy_file_range", "sendfile", "posix_fallocate",
})
#: ``os.open`` flags that read: any other flag (O_WRONLY, O_CREAT, a name the scan cannot resolve) counts as a write.
READ_FLAGS = frozenset({"O_RDONLY", "O_NOFOLLOW", "O_CLOEXEC", "O_NONBLOCK", "O_DIRECTORY", "O_NOATIME", "O_NOCTTY", "O_PATH"})
#: ``shutil`` functions that write (everything but the read-only helpers).
SHUTIL_READERS = frozenset({"which", "disk_usage", "get_terminal_size", "get_archive_formats", "get_unpack_formats"})
#: ``tempfile`` functions that create files or directories.
TEMPFILE_WRITERS = frozenset({"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile", "TemporaryDirectory"})
#: Methods that write whatever they are called on: ``pathlib.Path``'s writers, NumPy's ``tofile`` and
#: Matplotlib's ``savefig`` (a file written by a library call is still a Python write).
WRITER_METHODS = frozenset({
    "write_text", "write_bytes", "mkdir", "unlink", "touch", "rmdir", "symlink_to", "hardlink_to", "link_to",
    "tofile", "savefig", "chmod",
})
#: ``Path.rename(target)``/``Path.replace(target)``: one argument, no keywords (``str.replace`` takes two,
#: ``dataclasses.replace`` takes keywords).
ONE_ARG_WRITER_METHODS = frozenset({"rename", "replace"})
#: Module-level writers of other libraries.
LIBRARY_WRITERS = {"numpy": {"save", "savez", "savez_compressed", "savetxt"}, "io": {"open"}}


@dataclass(frozen=True)
class Exception_:
    """A write outside ``storage/`` that stays, and why."""

    module: str
    function: str
    call: str
    why: str


#: The only writes allowed outside ``storage/``. Keyed by module, enclosing function and call, not by
#: line, so an edit elsewhere in the file does not move the exception onto a new write.
EXCEPTIONS = (
    Exception_("storage/metadata_lock.py", "_take", "os.open",
               "creates the empty file the metadata lock flocks: nothing is written to it, and a power cut "
               "that loses it loses no lock (the kernel dropped every lock anyway)"),
    Exception_("cli.py", "main", "os.open",
               "opens /dev/null O_WRONLY to point a closed pipe's stdout at it (dup2): no file is created or written"),
)
# Not Python calls, so not scanned, and not exceptions either: git and DVC, run as subprocesses by
# integrations/dvc, write their own files (.git objects, the DVC cache); ckstore journals around them.


def _is_write_mode(node: ast.expr | None) -> bool:
    """True when a mode argument may write: a string with w, a, x or +, or anything not a constant."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return any(c in node.value for c in "wax+")
    return True  # a mode computed at run time cannot be proven read-only


def _mode_arg(call: ast.Call, position: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    return call.args[position] if len(call.args) > position else None


_MODE_CHARS = frozenset("rwxabt+U")


def _method_mode(call: ast.Call) -> ast.expr | None:
    """The mode of ``<obj>.open(...)``: ``mode=``, else the first string argument made of mode letters.

    ``Path.open(mode)`` and ``fs.open(path, mode)`` put it in different places; a method
    ``open`` without a recognisable mode opens for reading by default.
    """
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    for arg in call.args[:2]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value and set(arg.value) <= _MODE_CHARS:
            return arg
    return None


def _opens_for_write(flags: ast.expr, assigned: dict[str, list[ast.expr]]) -> bool:
    """True unless ``flags`` is provably read-only: built only of read-only ``O_*`` names, through
    names assigned in the module (``_OPEN_FLAGS = os.O_RDONLY | ...``), ``getattr(os, "O_X", 0)`` and numbers."""
    seen: set[str] = set()

    def unsafe(node: ast.expr) -> bool:
        if isinstance(node, ast.BinOp):
            return unsafe(node.left) or unsafe(node.right)
        if isinstance(node, ast.Attribute):
            return node.attr not in READ_FLAGS
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value not in READ_FLAGS or isinstance(node.value, int) and node.value != 0
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            return any(unsafe(arg) for arg in node.args[1:])
        if isinstance(node, ast.Name):
            if node.id in READ_FLAGS:
                return False
            if node.id in seen or node.id not in assigned:
                return node.id not in seen  # an unknown name may hold anything
            seen.add(node.id)
            return any(unsafe(value) for value in assigned[node.id])
        return True

    return unsafe(flags)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it is: ``"os"``, ``"os.replace"``, ``"shutil"``, ``"numpy"``…, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            # A relative import (from ..storage import durable) keeps its dots: never mistaken for os.
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                names[alias.asname or alias.name] = f"{module}.{alias.name}"
    return names


def _enclosing_functions(tree: ast.AST) -> dict[int, str]:
    """id(node) -> the name of the innermost function (or ``<module>``) holding it."""
    owner: dict[int, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            owner[id(child)] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def find_writes(source: str) -> list[tuple[int, str, str]]:
    """Every write to the disk the module's source makes: ``(line, enclosing function, call)``."""
    tree = ast.parse(source)
    names = _aliases(tree)
    owner = _enclosing_functions(tree)
    found: list[tuple[int, str, str]] = []

    # Names bound to an in-memory buffer (buf = io.BytesIO()), per function: fig.savefig(buf) or
    # np.save(buf, a) renders into memory, and the storage layer writes the bytes.
    buffers: set[tuple[str, str]] = set()
    assigned: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            made = f"{names.get(f.value.id, f.value.id)}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if made in ("io.BytesIO", "io.StringIO"):
                buffers |= {(owner.get(id(node), "<module>"), t.id) for t in node.targets if isinstance(t, ast.Name)}

    def hit(node: ast.Call | ast.ImportFrom, call: str) -> None:
        function = owner.get(id(node), "<module>")
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name) and (function, node.args[0].id) in buffers:
            return
        found.append((node.lineno, function, call))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil", "tempfile") and not node.level:
            for alias in node.names:  # from os import replace: the name is then called bare
                qual = f"{node.module}.{alias.name}"
                if _is_writer_name(qual):
                    hit(node, qual)
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        qual = None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
            qual = f"{names[func.value.id]}.{func.attr}"
        elif isinstance(func, ast.Name):
            qual = names.get(func.id, func.id if func.id == "open" else None)
        if qual is not None:
            if qual == "os.open" and len(node.args) > 1 and _opens_for_write(node.args[1], assigned):
                hit(node, qual)
                continue
            if qual in ("open", "io.open") and _is_write_mode(_mode_arg(node, 1)):
                hit(node, qual)
                continue
            if qual == "os.fdopen" and _is_write_mode(_mode_arg(node, 1)):
                hit(node, qual)
                continue
            if _is_writer_name(qual):
                hit(node, qual)
                continue
        if isinstance(func, ast.Attribute) and qual is None:
            receiver = func.value
            if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
                continue  # a backend calling its base class's operation (storage/recording.py), not a Path
            if func.attr in WRITER_METHODS:
                hit(node, f".{func.attr}")
            elif func.attr in ONE_ARG_WRITER_METHODS and len(node.args) == 1 and not node.keywords:
                hit(node, f".{func.attr}")
            elif func.attr == "open" and _is_write_mode(_method_mode(node)):
                hit(node, ".open")  # Path.open("w"), fs.open(path, "wb")
    return found


def _is_writer_name(qual: str) -> bool:
    module, _, name = qual.rpartition(".")
    if module == "os":
        return name in OS_WRITERS
    if module == "shutil":
        return name not in SHUTIL_READERS
    if module == "tempfile":
        return name in TEMPFILE_WRITERS
    return name in LIBRARY_WRITERS.get(module, ())


def unlisted_writes(root: Path, may_write, *, within: str = "") -> list[str]:
    """Writes in the modules of ``root`` (under ``within``) that ``may_write(rel)`` refuses and
    :data:`EXCEPTIONS` does not name."""
    allowed = {(e.module, e.function, e.call) for e in EXCEPTIONS}
    out = []
    for module in _modules(root):
        rel = _rel(module, root)
        if not rel.startswith(within) or may_write(rel):
            continue
        for line, function, call in find_writes(module.read_text()):
            if (rel, function, call) not in allowed:
                out.append(f"{rel}:{line} {call} (in {function})")
    return out


def writes_outside_storage(root: Path) -> list[str]:
    return unlisted_writes(root, lambda rel: rel.startswith("storage/"))


def test_only_storage_writes_to_the_disk():
    assert writes_outside_storage(PACKAGE) == [], "route the write through ckstore.storage (a hooked durable operation with a site name)"


def test_inside_storage_only_durable_makes_the_system_calls():
    """The backends (local, recording) call ``storage.durable``; only it calls ``os``, so every
    operation passes its hook with a stable site name (the fault-injection tiers key on them)."""
    assert unlisted_writes(PACKAGE, lambda rel: rel == "storage/durable.py", within="storage/") == []


def test_every_exception_is_still_needed():
    """An exception whose write has gone would silently allow the next write made in its place."""
    for exc in EXCEPTIONS:
        found = find_writes((PACKAGE / exc.module).read_text())
        assert (exc.function, exc.call) in {(f, c) for _, f, c in found}, exc


#: One planted write of each kind the scan looks for, and a read that must not count.
PLANTED_WRITES = {
    "os.makedirs": "import os\ndef f(p):\n    os.makedirs(p)\n",
    "os.mkdir": "import os as o\ndef f(p):\n    o.mkdir(p)\n",
    "os.rename": "import os\nos.rename('a', 'b')\n",
    "os.replace": "from os import replace\n",
    "os.link": "import os\nos.link('a', 'b')\n",
    "os.symlink": "import os\nos.symlink('a', 'b')\n",
    "os.unlink": "import os\nos.unlink('a')\n",
    "os.remove": "import os\nos.remove('a')\n",
    "os.rmdir": "import os\nos.rmdir('a')\n",
    "os.fsync": "import os\nos.fsync(3)\n",
    "os.ftruncate": "import os\nos.ftruncate(3, 0)\n",
    "os.write": "import os\nos.write(3, b'x')\n",
    "os.open write flags": "import os\nfd = os.open('p', os.O_WRONLY | os.O_CREAT)\n",
    "os.open flags through a name": "import os\n_FLAGS = os.O_RDONLY | getattr(os, 'O_CREAT', 0)\nfd = os.open('p', _FLAGS)\n",
    "os.open unknown flags": "import os\ndef f(p, flags):\n    return os.open(p, flags)\n",
    "os.fdopen w": "import os\nf = os.fdopen(3, 'wb')\n",
    "open w": "def f(p):\n    with open(p, 'w') as fh:\n        pass\n",
    "open a": "open('p', mode='a')\n",
    "open x": "open('p', 'xb')\n",
    "open r+": "open('p', 'r+b')\n",
    "open computed mode": "def f(p, m):\n    return open(p, m)\n",
    "io.open w": "import io\nio.open('p', 'wb')\n",
    "shutil.copy": "import shutil\nshutil.copy('a', 'b')\n",
    "shutil.rmtree": "from shutil import rmtree\n",
    "shutil.move": "import shutil\nshutil.move('a', 'b')\n",
    "shutil.copytree": "import shutil\nshutil.copytree('a', 'b')\n",
    "Path.write_text": "from pathlib import Path\nPath('p').write_text('x')\n",
    "Path.write_bytes": "def f(p):\n    p.write_bytes(b'x')\n",
    "Path.mkdir": "def f(p):\n    p.mkdir(parents=True)\n",
    "Path.unlink": "def f(p):\n    p.unlink(missing_ok=True)\n",
    "Path.rename": "def f(p, q):\n    p.rename(q)\n",
    "Path.replace": "def f(p, q):\n    p.replace(q)\n",
    "Path.touch": "def f(p):\n    p.touch()\n",
    "Path.rmdir": "def f(p):\n    p.rmdir()\n",
    "Path.symlink_to": "def f(p, q):\n    p.symlink_to(q)\n",
    "Path.hardlink_to": "def f(p, q):\n    p.hardlink_to(q)\n",
    "Path.open w": "def f(p):\n    return p.open('w')\n",
    "tempfile.mkstemp": "import tempfile\ntempfile.mkstemp()\n",
    "tempfile.NamedTemporaryFile": "import tempfile\ntempfile.NamedTemporaryFile()\n",
    "tempfile.mkdtemp": "from tempfile import mkdtemp\n",
    "numpy.save": "import numpy as np\nnp.save('p', 1)\n",
    "savefig": "def f(fig, out):\n    fig.savefig(out)\n",
    "savefig to a buffer of another function": "import io\ndef f():\n    png = io.BytesIO()\ndef g(fig, png):\n    fig.savefig(png)\n",
}

#: Calls that look alike but do not write: the scan must not cry wolf on them.
HARMLESS = textwrap.dedent("""
    import dataclasses, io, os, shutil, sys
    from pathlib import Path
    open('p', 'rb'); open('p'); os.open('p', os.O_RDONLY | os.O_NOFOLLOW); os.fdopen(3, 'rb')
    _READ = os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0)
    os.open('p', _READ | os.O_CLOEXEC)
    'a-b'.replace('-', '_'); dataclasses.replace(obj, step=2); Path('p').open('rb'); Path('p').read_bytes()
    shutil.which('git'); shutil.get_terminal_size(); os.listdir('.'); os.stat('p'); os.path.join('a', 'b')
    sys.stdout.write('x')
    def render(fig, np):
        png = io.BytesIO()
        fig.savefig(png, format='png'); np.save(png, 1)
""")


@pytest.mark.parametrize("kind", sorted(PLANTED_WRITES))
def test_the_write_scan_fails_on_a_planted_write(tmp_path, kind):
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "backend.py").write_text(PLANTED_WRITES[kind])  # inside storage/: allowed
    assert writes_outside_storage(tmp_path) == []
    (tmp_path / "planted.py").write_text(PLANTED_WRITES[kind])
    found = writes_outside_storage(tmp_path)
    assert len(found) == 1 and found[0].startswith("planted.py:"), (kind, found)


def test_the_write_scan_passes_reads_and_look_alikes(tmp_path):
    (tmp_path / "harmless.py").write_text(HARMLESS)
    assert writes_outside_storage(tmp_path) == []


def test_an_exception_covers_only_its_own_function(tmp_path):
    """The cli's /dev/null exception must not excuse the same call in another function of the module."""
    source = "import os\ndef main():\n    os.open(os.devnull, os.O_WRONLY)\ndef other(p):\n    os.open(p, os.O_WRONLY)\n"
    (tmp_path / "cli.py").write_text(source)
    assert writes_outside_storage(tmp_path) == ["cli.py:5 os.open (in other)"]


# ---------------------------------------------------------------- imports point one way

#: The layers, lowest first. A module imports only from its own layer or a lower one. A layer is a
#: folder of ckstore/ (or one top-level module): the folder list is the architecture.
LAYERS = (
    ("errors",),  # the exception tree: imports nothing of ckstore
    ("format",),  # bytes <-> values, no I/O
    ("storage",),  # the only code that touches the disk
    ("engine",),  # the tensor-file write pipeline and read placement, no knowledge of store paths
    ("state",),  # encode/decode a training state to a skeleton and tensor files
    ("checkpoint",),  # commit protocol, catalog, retention, background work
    ("store",),  # Store: validates arguments and wires the parts above
    ("distributed",),  # many ranks, one commit: the DCP storage pair and the coordinator, on the store's protocol
    ("training",),  # resume, Checkpointer, samplers, RNG
    ("__init__",),  # the public API: `import ckstore`
    ("integrations",),  # DVC, Lightning, importers: on top of the public API
    ("cli", "_cli", "__main__"),
)
_LAYER_OF = {name: n for n, names in enumerate(LAYERS) for name in names}

#: Internal modules the integrations may import besides the public API (``ckstore``, ``ckstore.errors``),
#: and why. Anything else an integration needs belongs in the public API.
INTEGRATION_INTERNALS = {
    "ckstore.storage.durable": "integrations write files (.dvc files, the DVC journal, pulled checkpoints, exports, "
                               "a resume scratch for Trainer); only storage writes",
    "ckstore.storage.layout": "the store's file names: publish ignores them (.dvcignore), "
                              "pull refuses a store with quarantined checkpoints",
    "ckstore.storage.lock": "the store's lock file names (.dvcignore) and the writer lock a pull takes",
    "ckstore.storage.metadata_lock": "the metadata lock file's name (.dvcignore)",
    "ckstore.storage.safeio": "the one no-follow, non-blocking, capped open of a store file: manifests, .dvc files, the files publish hashes",
    "ckstore.checkpoint.metrics_log": "the metrics log's name (.dvcignore)",
    "ckstore.format.tags": "tags.json's name (.dvcignore)",
    "ckstore.format.manifest": "publish and pull check each file against the manifest before pushing or after pulling",
    "ckstore.format.hashing": "hashing while streaming a file to DVC (the manifest's algorithm and md5)",
    "ckstore.format.chunks": "a format-2 file's chunk table and root, computed while streaming it to or from DVC or writing the weights file",
    "ckstore.format.skeleton": "publish rewrites the manifest's tensor references to the stable weights file (its tag key)",
    "ckstore.format.safetensors": "publish copies tensors byte for byte into the stable weights file through the checked header parser",
    "ckstore.engine.worker": "the one background-worker primitive (ordered thread, unseen failures, exit and fork "
                             "handling) the publish thread shares with saves",
    "ckstore.store": "type hints only (TYPE_CHECKING): functions take a Store",
}

#: Upward imports that exist today, each to be removed (the list only shrinks). An entry that no longer
#: occurs fails the test, so a fix cannot leave its entry behind.
#: Upward imports still to remove; empty. (Store.publish imported the DVC integration lazily while the
#: integration imported Store, a cycle hidden behind a function-level import; Store now finds the
#: publisher through the "ckstore.publishers" entry point the package declares.)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(["ckstore", *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))


def _resolve(root: Path, name: str) -> str:
    """The module ``name`` names: a ``from pkg import name`` of a function resolves to ``pkg``."""
    parts = name.split(".")
    while len(parts) > 1:
        path = root.joinpath(*parts[1:])
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            break
        parts.pop()
    return ".".join(parts)


def imports(root: Path) -> list[tuple[str, int, str]]:
    """``(importing module, line, imported ckstore module)`` for every import in the package, at any depth
    (function-level and ``TYPE_CHECKING`` imports too)."""
    out = []
    for module in _modules(root):
        rel = _rel(module, root)
        here = _module_name(rel)
        package = here if rel.endswith("__init__.py") else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                names = [f"{stem}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name == "ckstore" or name.startswith("ckstore."):
                    out.append((rel, node.lineno, _resolve(root, name)))
    return out


def _layer(name: str) -> int:
    """The layer of module ``ckstore.x.y`` (``ckstore`` itself is the public API)."""
    top = name.split(".")[1] if "." in name else "__init__"
    return _LAYER_OF[top]


def layering_violations(root: Path) -> list[str]:
    """Imports that point up a layer, or integrations reaching past the public API."""
    out = []
    for rel, line, target in imports(root):
        source = _module_name(rel)
        if _layer(target) > _layer(source):
            out.append(f"{rel}:{line} imports {target} (up from {LAYERS[_layer(source)][0]} to {LAYERS[_layer(target)][0]})")
        elif rel.startswith("integrations/") and not target.startswith("ckstore.integrations"):
            if target not in ("ckstore", "ckstore.errors") and target not in INTEGRATION_INTERNALS:
                out.append(f"{rel}:{line} imports {target} (integrations use the public API)")
    return out


def test_every_folder_has_a_layer():
    folders = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert folders == set(_LAYER_OF), "place a new folder in LAYERS"


def test_imports_point_one_way():
    found = layering_violations(PACKAGE)
    unknown = [v for v in found if (v.split(":")[0], v.split(" imports ")[1].split(" ")[0]) not in KNOWN_UPWARD]
    assert unknown == [], "an import points up a layer (or an integration past the public API)"
    gone = {k for k in KNOWN_UPWARD if not any(v.startswith(f"{k[0]}:") and f" imports {k[1]} " in v for v in found)}
    assert gone == set(), "remove the fixed entries from KNOWN_UPWARD"


def folder_cycles(root: Path) -> list[str]:
    """Folders that reach themselves through imports (KNOWN_UPWARD left out)."""
    edges: dict[str, set[str]] = {}
    for rel, _, target in imports(root):
        if (rel, target) in KNOWN_UPWARD:
            continue
        a, b = LAYERS[_layer(_module_name(rel))][0], LAYERS[_layer(target)][0]
        if a != b:
            edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return False

    return sorted(a for a in edges if reaches(a, a))


def test_no_cycle_between_folders():
    assert folder_cycles(PACKAGE) == []


#: A tiny package with one module per layer, importing only downward.
_CLEAN = {
    "__init__.py": "from .store import Store\n",
    "errors.py": "",
    "format/__init__.py": "", "format/manifest.py": "from ..errors import x\n",
    "storage/__init__.py": "", "storage/durable.py": "from ..format import manifest\n",
    "engine/__init__.py": "", "engine/tensorfile.py": "from ..storage import durable\n",
    "state/__init__.py": "", "state/encode.py": "from ..engine.tensorfile import f\n",
    "checkpoint/__init__.py": "", "checkpoint/commit.py": "from ..state import encode\n",
    "store.py": "from .checkpoint.commit import f\n",
    "training/__init__.py": "", "training/loop.py": "from ..store import Store\n",
    "integrations/__init__.py": "", "integrations/dvc/__init__.py": "",
    "integrations/dvc/publish.py": "import ckstore\nfrom ...storage import durable\n",
    "cli.py": "from .integrations.dvc import publish\nimport ckstore\n",
}


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("format/manifest.py", "from ..state.encode import tensor_refs\n"),  # upward, module level
        ("storage/durable.py", "def f():\n    from ..checkpoint import commit\n"),  # upward, inside a function
        ("store.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .integrations.dvc import publish\n"),
        ("errors.py", "import ckstore.format.manifest\n"),  # absolute
        ("engine/tensorfile.py", "from .. import store\n"),  # relative import of a top-level module
        ("integrations/dvc/publish.py", "from ...state.encode import f\n"),  # past the public API
    ],
)
def test_the_import_scan_fails_on_a_planted_import(tmp_path, module, planted):
    root = _plant(tmp_path, _CLEAN)
    assert layering_violations(root) == []
    (root / module).write_text((root / module).read_text() + planted)
    found = layering_violations(root)
    assert len(found) == 1 and found[0].startswith(f"{module}:"), found


def test_the_cycle_scan_fails_on_a_planted_cycle(tmp_path):
    root = _plant(tmp_path, _CLEAN)
    assert folder_cycles(root) == []
    (root / "storage/durable.py").write_text("def f():\n    from ..checkpoint import commit\n")
    assert folder_cycles(root) == ["checkpoint", "engine", "state", "storage"]


def test_store_finds_the_dvc_publisher_by_its_entry_point_and_names_the_group_when_missing(monkeypatch):
    """Store.publish reaches the DVC integration through the installed ckstore.publishers entry point (no upward import)."""
    from ckstore.checkpoint import plugins
    from ckstore.integrations.dvc import worker

    assert plugins.find_publisher("dvc") is worker.publish  # the real installed metadata
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: ())
    with pytest.raises(ckstore.DvcError, match="ckstore.publishers"):
        plugins.find_publisher("dvc")


def test_store_finds_its_multi_rank_implementation_by_entry_point_and_names_the_group_when_missing(monkeypatch, tmp_path):
    """Store(process_group=...) reaches ckstore.distributed.ranks through the ckstore.collectives entry point (no upward import)."""
    from ckstore.checkpoint import plugins
    from ckstore.distributed import ranks

    assert plugins.find_collective("torch") is ranks.attach  # the real installed metadata
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: ())
    with pytest.raises(ckstore.InvalidArgumentError, match="ckstore.collectives"):
        ckstore.Store(tmp_path / "store", process_group=object())
