"""Import checkpoints other tools wrote into a ckstore :class:`~ckstore.Store`.

>>> from ckstore.integrations.importers import import_checkpoint
>>> import_checkpoint("old/ckpt_500.pt", "runs/exp1", step=500)          # a torch.save file
>>> import_checkpoint("lightning_logs/epoch=0-step=11.ckpt", "runs/pl")  # step 11, from the file
>>> import_checkpoint("out/checkpoint-200", "runs/hf")                   # a Hugging Face Trainer checkpoint
>>> import_checkpoint("dcp/step-40", "runs/dcp")                         # a torch.distributed.checkpoint directory

Formats (``format="auto"`` tells them apart):

* ``torch``: a ``torch.save`` file. The state is what ``torch.load`` returns.
* ``lightning``: a Lightning ``.ckpt`` file (a ``torch.save`` dict with ``pytorch-lightning_version``).
  The state is Lightning's checkpoint dict as is (``state_dict``, ``optimizer_states``, ``loops``, ...),
  the step its ``global_step``, the metric the ``ModelCheckpoint`` monitored.
* ``hf``: a Hugging Face Trainer ``checkpoint-N`` directory, as the state ``CkstoreTrainer`` saves
  (``ckstore.integrations.hf``), so a run resumes from it: ``{"model": <the safetensors weights, HF names>,
  "hf": {"model": {"config", "generation_config"}}, "optimizer", "scheduler", "scaler", "rng": [one
  ckstore.RNGState state per rank], "trainer_state": <the JSON text>}`` (those present). The step is
  ``trainer_state.json``'s ``global_step``, the metrics the loss and ``eval_*`` values logged at that step.
  Other files are not imported and are listed in ``ImportResult.skipped``: ``training_args.bin`` is a
  pickled ``TrainingArguments`` object (code to run, not data), tokenizer files are not training state, and
  RNG state of devices ``RNGState`` does not restore (``rng_state.pth:xpu``).
* ``dcp``: a ``torch.distributed.checkpoint`` directory, read in one process. The state is the nested dict
  DCP's own reader rebuilds (``dcp_to_torch_save``).

**Nothing is unpickled that needs code to run.** ``torch.save`` files are read with ``torch.load(...,
weights_only=True)`` (plus NumPy's plain arrays and dtypes, as the Trainer's ``rng_state.pth`` needs), DCP's
``.metadata`` pickle with an unpickler that knows DCP's own metadata classes and nothing else, and DCP's
non-tensor entries with ``weights_only=True`` again (DCP's reader uses plain ``pickle`` for both, which runs
whatever the file names). Anything else is refused with :class:`UnsafePickleError`, naming the file and the
global, before anything is written. The source is opened read-only and never modified.

The step comes from the source where it carries one (Lightning, HF, or a top-level integer ``global_step`` or
``step`` in a ``torch.save`` or DCP dict); ``step=`` overrides it, and is needed where there is none. The
import is one :meth:`Store.save`: atomic and durable like any save, then verified.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ckstore

__all__ = [
    "FORMATS",
    "ImportResult",
    "SourceCheckpoint",
    "UnsafePickleError",
    "detect_format",
    "import_checkpoint",
    "numpy_allowed",
    "read_checkpoint",
]

FORMATS = ("torch", "lightning", "hf", "dcp")

#: Progress callback: ``progress(done_bytes, total_bytes)`` as source files are read.
Progress = Callable[[int, int], None]

# Messages end with these, so the CLI can say the same in its own options (``--step``, ``--format``).
STEP_ADVICE = "pass step=N"
FORMAT_ADVICE = "pass format= one of torch, lightning, hf, dcp"

_HF_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
_HF_JSON_FILES = {"trainer_state.json": "trainer_state", "config.json": "config", "generation_config.json": "generation_config"}
_HF_RNG = re.compile(r"rng_state(_[0-9]+)?\.pth", re.ASCII)
_HF_STEP_DIR = re.compile(r"checkpoint-([0-9]+)", re.ASCII)
_JSON_CAP = 64 << 20  # trainer_state.json of a long run is a few MiB; a bigger "JSON" file is not one


class UnsafePickleError(ckstore.CkstoreError, pickle.UnpicklingError):
    """A source file's pickle names a global that only code execution could rebuild; nothing was imported.

    ``path`` is the file, ``global_name`` the offending global (``posix.system``, ``mymodule.MyClass``).
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str], global_name: str) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.global_name = global_name


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_checkpoint` committed: ``info`` (the new checkpoint), the ``format`` read, the
    ``source``, the source files it read (``files``) and those it left out (``skipped``, relative names)."""

    info: ckstore.CheckpointInfo
    format: str
    source: Path
    files: tuple[str, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class SourceCheckpoint:
    """A checkpoint read from another tool's files by :func:`read_checkpoint`, nothing written yet."""

    format: str
    state: Any
    step: int | None
    metrics: dict[str, float]
    files: tuple[str, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class _Read:
    state: Any
    step: int | None
    metrics: dict[str, float]
    files: tuple[str, ...]
    skipped: tuple[str, ...]


# ---------------------------------------------------------------- safe unpickling


def _numpy_globals() -> list[Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    # Numeric, bool, bytes and str arrays and their dtype classes: rebuilding them runs no code from the file.
    # Object arrays stay refused (their dtype class, 'O', is not listed). The Trainer's rng_state.pth holds a uint32 one.
    dtypes = {type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDGSUV"}
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]


@contextmanager
def numpy_allowed() -> Iterator[None]:
    """``torch.load(..., weights_only=True)`` that also accepts plain NumPy arrays and dtypes, as imports do."""
    with torch.serialization.safe_globals(_numpy_globals()):
        yield


def _refuse(path: str, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refusing to unpickle {name}: rebuilding it would run code from the file. Only tensors, "
        "containers, numbers, strings and NumPy arrays are imported; load it yourself only if you trust its author, "
        "then save it as a plain state",
        path=path,
        global_name=name,
    )


def _torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` with NumPy arrays allowed; an unsafe global is an UnsafePickleError."""
    if zipfile.is_zipfile(path):  # torch.save's format since 1.6: name the unsafe globals before unpickling anything
        with numpy_allowed():
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as exc:  # not a torch.save archive after all (a .zip of something else)
                raise ckstore.InvalidArgumentError(f"{path}: not a torch.save file ({exc})") from exc
        if unsafe:
            raise _refuse(path, ", ".join(sorted(unsafe)))
    try:
        with numpy_allowed(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the legacy format; the check below is what matters
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        names = [found.group(1)] if found else _pickled_globals(path)
        if names:
            raise _refuse(path, ", ".join(names)) from None
        raise ckstore.InvalidArgumentError(f"{path}: not a readable torch.save file ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # the unpickler of an arbitrary file fails in many ways (KeyError, EOFError, ...)
        raise ckstore.InvalidArgumentError(f"{path}: not a readable torch.save file ({str(exc).splitlines()[0]})") from None


_SAFE_LEGACY = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}


def _pickled_globals(path: str) -> list[str]:
    """The globals a plain (non-zip) pickle names, read with pickletools: nothing is unpickled or run.

    Used only to say which global made ``torch.load(weights_only=True)`` refuse a legacy file.
    """
    import pickletools

    found: list[str] = []
    strings: list[Any] = []  # recent string pushes, for STACK_GLOBAL (module, name)
    memo: dict[int, Any] = {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = strings[-1] if strings else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(int(arg)))
                elif op.name == "GLOBAL":
                    found.append(".".join(str(arg).split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if op.name == "STOP":
                    break
    except Exception:  # a malformed pickle: report what was seen up to there
        pass
    names = []
    for name in found:
        if name not in _SAFE_LEGACY and not re.fullmatch(r"torch\.\w*Storage", name) and name not in names:
            names.append(name)
    return names


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP writes ``.metadata`` with plain pickle; this reads it knowing DCP's metadata classes and nothing else."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_md

        if module == dcp_md.__name__ and isinstance(getattr(dcp_md, name, None), type):
            return getattr(dcp_md, name)  # Metadata, TensorStorageMetadata, ChunkStorageMetadata, the memory-format enum, ...
        if (module, name) == (dcp_fs.__name__, "_StorageInfo"):
            return dcp_fs._StorageInfo
        if (module, name) == ("torch", "Size"):
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # looks a layout up by name in a table
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return getattr(__import__("pathlib"), name)  # StorageMeta's checkpoint_id
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise _refuse(self._path, f"{module}.{name}")


# ---------------------------------------------------------------- readers


def _metrics(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and isinstance(key, str) and key:
            out[key] = float(value)
    return out


def _top_level_step(state: Any) -> int | None:
    if isinstance(state, Mapping):
        for key in ("global_step", "step"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = int(value.item())
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None


def _is_lightning(state: Any) -> bool:
    return isinstance(state, Mapping) and "pytorch-lightning_version" in state and "state_dict" in state


def _read_torch(path: Path, progress: Progress | None, *, lightning: bool | None) -> tuple[str, _Read]:
    size = path.stat().st_size
    state = _torch_load(str(path))
    if progress:
        progress(size, size)
    is_pl = _is_lightning(state) if lightning is None else lightning
    if lightning and not _is_lightning(state):
        raise ckstore.InvalidArgumentError(f"{path}: not a Lightning checkpoint (no 'pytorch-lightning_version' and 'state_dict')")
    metrics: dict[str, float] = {}
    if is_pl:
        # The ModelCheckpoint callbacks' monitored score at this step: what ranks it, as in Lightning.
        for key, value in (state.get("callbacks") or {}).items():
            if isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(value, Mapping):
                monitor, score = value.get("monitor"), value.get("current_score")
                if isinstance(monitor, str) and score is not None:
                    metrics.update(_metrics({monitor: score}))
    return ("lightning" if is_pl else "torch"), _Read(state, _top_level_step(state), metrics, (path.name,), ())


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _JSON_CAP:
        raise ckstore.InvalidArgumentError(f"{path}: larger than {_JSON_CAP >> 20} MiB; not a Trainer JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ckstore.InvalidArgumentError(f"{path}: not valid JSON ({exc})") from None


def _read_text(path: Path) -> str:
    if path.stat().st_size > _JSON_CAP:
        raise ckstore.InvalidArgumentError(f"{path}: larger than {_JSON_CAP >> 20} MiB; not a Trainer JSON file")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ckstore.InvalidArgumentError(f"{path}: not valid JSON ({exc})") from None
    return text


def _rng_from_hf(saved: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """The Trainer's ``rng_state.pth`` dict as a :class:`ckstore.RNGState` state dict; also the generators left out."""
    import numpy as np

    if not isinstance(saved, Mapping):
        raise ckstore.InvalidArgumentError(f"{path}: not a Trainer RNG state (a dict), got {type(saved).__name__}")
    out: dict[str, Any] = {}
    try:
        if "python" in saved:
            version, words, gauss = saved["python"]
            out["python"] = {"version": int(version), "state": torch.tensor(list(words), dtype=torch.int64), "gauss_next": gauss}
        if "numpy" in saved:
            name, key, pos, has_gauss, gauss = saved["numpy"]
            out["numpy"] = {"bit_generator": str(name), "key": np.asarray(key, dtype=np.uint32), "pos": int(pos),
                            "has_gauss": int(has_gauss), "gauss": float(gauss)}
        if "cpu" in saved:
            out["torch"] = saved["cpu"]
        if "cuda" in saved:  # get_rng_state_all(): one state per device
            cuda = saved["cuda"]
            out["cuda"] = [cuda] if isinstance(cuda, torch.Tensor) else list(cuda)
    except (TypeError, ValueError) as exc:
        raise ckstore.InvalidArgumentError(f"{path}: not a Trainer RNG state ({exc})") from None
    left_out = sorted(str(k) for k in saved if k not in ("python", "numpy", "cpu", "cuda"))  # xpu, npu, mps, ...
    return out, left_out


def _read_hf(root: Path, progress: Progress | None) -> _Read:
    """A Trainer ``checkpoint-N`` directory as the state ``CkstoreTrainer`` saves (``ckstore.integrations.hf``), so
    it resumes from an imported one: ``model`` (the safetensors weights, HF names), ``hf`` (``{"model": {"config",
    "generation_config"}}``: the JSON texts, for export), ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (one
    :class:`ckstore.RNGState` state per rank) and ``trainer_state`` (the JSON text)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    names = sorted(p.name for p in root.iterdir())
    plan: list[tuple[str, str]] = []  # (file, how)
    if "model.safetensors.index.json" in names:
        index = _read_json(root / "model.safetensors.index.json")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, Mapping) else []
        if not shards or any(s not in names or "/" in s for s in shards):
            raise ckstore.InvalidArgumentError(f"{root}/model.safetensors.index.json: its weight_map names no shard in {root}")
        plan += [("model.safetensors.index.json", "index")] + [(s, "shard") for s in shards]
    elif "model.safetensors" in names:
        plan.append(("model.safetensors", "shard"))
    elif "pytorch_model.bin" in names:
        plan.append(("pytorch_model.bin", "torch-model"))
    else:
        raise ckstore.InvalidArgumentError(f"{root}: no model.safetensors, sharded index or pytorch_model.bin; not a Trainer checkpoint")
    plan += [(n, "torch") for n in names if n in _HF_TORCH_FILES]
    plan += [(n, "rng") for n in names if _HF_RNG.fullmatch(n)]
    plan += [(n, "json") for n in names if n in _HF_JSON_FILES]
    total = sum((root / n).stat().st_size for n, _ in plan)
    done = 0
    state: dict[str, Any] = {"model": {}}
    texts: dict[str, str] = {}
    rng_by_rank: dict[int, dict[str, Any]] = {}
    left_out: list[str] = []
    for name, how in plan:
        path = root / name
        if how == "shard":
            try:
                state["model"].update(load_file(path))
            except (SafetensorError, OSError) as exc:
                raise ckstore.InvalidArgumentError(f"{path}: not a readable safetensors file ({exc})") from None
        elif how == "torch-model":
            state["model"] = _torch_load(str(path))
        elif how == "torch":
            state[name.rsplit(".", 1)[0]] = _torch_load(str(path))
        elif how == "rng":
            rank = _HF_RNG.fullmatch(name).group(1)  # type: ignore[union-attr]
            rng_by_rank[int(rank[1:]) if rank else 0], dropped = _rng_from_hf(_torch_load(str(path)), path)
            left_out += [f"{name}:{d}" for d in dropped]
        elif how == "json":
            texts[_HF_JSON_FILES[name]] = _read_text(path)
        done += path.stat().st_size
        if progress:
            progress(done, total)
    if rng_by_rank:
        if sorted(rng_by_rank) != list(range(len(rng_by_rank))):
            raise ckstore.InvalidArgumentError(f"{root}: RNG states for ranks {sorted(rng_by_rank)}, not 0..N-1")
        state["rng"] = [rng_by_rank[r] for r in range(len(rng_by_rank))]
    meta = {k: texts[k] for k in ("config", "generation_config") if k in texts}
    if meta:
        state["hf"] = {"model": meta}
    if "trainer_state" in texts:
        state["trainer_state"] = texts["trainer_state"]
    trainer_state = json.loads(texts["trainer_state"]) if "trainer_state" in texts else None
    step = _top_level_step(trainer_state)
    if step is None and (m := _HF_STEP_DIR.fullmatch(root.name)):
        step = int(m.group(1))
    metrics: dict[str, float] = {}
    if isinstance(trainer_state, Mapping) and step is not None:
        # As CkstoreTrainer records them: the training loss and eval metrics logged at this step.
        for entry in trainer_state.get("log_history") or []:
            if isinstance(entry, Mapping) and entry.get("step") == step:
                metrics.update(_metrics({k: v for k, v in entry.items() if k == "loss" or str(k).startswith("eval_")}))
    read = {n for n, _ in plan}
    skipped = tuple(n for n in names if n not in read) + tuple(left_out)
    return _Read(state, step, metrics, tuple(n for n in names if n in read), skipped)


def _read_dcp(root: Path, progress: Progress | None) -> _Read:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta, TensorStorageMetadata

    meta_path = str(root / ".metadata")

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(meta_path, "rb") as f:
                metadata = _DcpMetadataUnpickler(f, meta_path).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DCP's planner unpickles these with weights_only=False: a crafted entry would run code.
            loaded[read_item.dest_index.fqn] = _torch_load_bytes(value, f"{root}/{read_item.dest_index.fqn}")

    loaded: dict[str, Any] = {}  # the non-tensor entries (the planner may hold a copy of the template's dict)
    reader = SafeReader(str(root))
    metadata = reader.read_metadata()
    if not isinstance(getattr(metadata, "state_dict_metadata", None), Mapping):
        raise ckstore.InvalidArgumentError(f"{meta_path}: not DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:  # reads stay inside the source
            raise ckstore.InvalidArgumentError(f"{meta_path}: names a data file outside {root}: {rel!r}")
    template: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            template[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            template[fqn] = None
    files = sorted(p.name for p in root.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process", which is the case
        dcp.load(template, storage_reader=reader, planner=SafePlanner(flatten_state_dict=False))
    if progress:
        total = sum((root / n).stat().st_size for n in files)
        progress(total, total)
    template.update(loaded)
    state = _unflatten(template, getattr(metadata, "planner_data", None) or {})
    return _Read(state, _top_level_step(state), {}, tuple(files), ())


def _torch_load_bytes(value: io.BytesIO, where: str) -> Any:
    try:
        with numpy_allowed():
            return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise _refuse(where, found.group(1) if found else "an unsupported global") from None


def _unflatten(flat: Mapping[str, Any], paths: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's flat ``a.b.0`` keys back into nested dicts and lists, by the key paths its metadata records."""
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = paths.get(fqn, (fqn,))
        node: Any = out
        for key, nxt in zip(path, path[1:]):
            empty: Any = [] if isinstance(nxt, int) else {}
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                node[key] = node[key] if node[key] is not None else empty
                node = node[key]
            else:
                node = node.setdefault(key, empty)
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= last:
                node.append(None)
        node[last] = value
    return out


# ---------------------------------------------------------------- the API


def detect_format(src: str | os.PathLike[str]) -> str:
    """``"dcp"`` for a directory with ``.metadata``, ``"hf"`` for a Trainer checkpoint directory, ``"torch"`` for a
    file (``"lightning"`` is told from ``"torch"`` by the file's content, once read)."""
    path = Path(src)
    if path.is_dir():
        if (path / ".metadata").is_file():
            return "dcp"
        markers = ("trainer_state.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if any((path / n).is_file() for n in markers):
            return "hf"
        raise ckstore.InvalidArgumentError(f"{path}: a directory that is neither a DCP checkpoint (.metadata) nor a Trainer checkpoint-N")
    if path.is_file():
        return "torch"
    raise ckstore.CheckpointNotFoundError(f"{path}: missing (no such file or directory)", step=None)


def read_checkpoint(src: str | os.PathLike[str], *, format: str = "auto", progress: Progress | None = None) -> SourceCheckpoint:
    """Read ``src`` (unsafe pickles refused, as for an import) without writing anything."""
    if format != "auto" and format not in FORMATS:
        raise ckstore.InvalidArgumentError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}; {FORMAT_ADVICE}")
    path = Path(os.path.abspath(src))
    found = detect_format(path)
    kind = found if format == "auto" else format
    if (kind in ("torch", "lightning")) != (found == "torch"):
        raise ckstore.InvalidArgumentError(f"{path}: is a {'file' if found == 'torch' else 'directory'}, not a {kind} checkpoint")
    if kind in ("torch", "lightning"):
        kind, read = _read_torch(path, progress, lightning=None if format == "auto" else kind == "lightning")
    elif kind == "hf":
        read = _read_hf(path, progress)
    else:
        if not (path / ".metadata").is_file():
            raise ckstore.InvalidArgumentError(f"{path}: no .metadata; not a DCP checkpoint")
        read = _read_dcp(path, progress)
    return SourceCheckpoint(kind, read.state, read.step, read.metrics, read.files, read.skipped)


def import_checkpoint(
    src: str | os.PathLike[str],
    store: ckstore.Store | str | os.PathLike[str],
    *,
    step: int | None = None,
    name: str | None = None,
    format: str = "auto",
    progress: Progress | None = None,
) -> ImportResult:
    """Import the checkpoint at ``src`` into ``store`` (a Store, or a path: opened, and created if new).

    ``step`` overrides the step the source carries (required if it carries none); ``name`` tags the
    imported checkpoint. The save is atomic and durable; the new checkpoint is verified before this
    returns (:class:`ckstore.IntegrityError` if not). Raises :class:`UnsafePickleError` for a pickle that
    needs code execution, :class:`ckstore.InvalidArgumentError` for a source that is not a checkpoint.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ckstore.InvalidArgumentError(f"step must be an integer, got {type(step).__name__}")
    if not isinstance(store, ckstore.Store):
        with ckstore.Store(store) as opened:
            return import_checkpoint(src, opened, step=step, name=name, format=format, progress=progress)
    source = read_checkpoint(src, format=format, progress=progress)
    chosen = step if step is not None else source.step
    if chosen is None:
        raise ckstore.InvalidArgumentError(f"{os.path.abspath(src)}: the {source.format} checkpoint carries no step number; {STEP_ADVICE}")
    info = store.save(source.state, step=chosen, metrics=source.metrics, tags=[name] if name is not None else ())
    problems = store.verify(info.step)
    if problems:
        first = problems[0]
        raise ckstore.IntegrityError(f"imported step {info.step} failed verification: {first.message}", path=first.path,
                                     expected=first.expected, actual=first.actual)
    return ImportResult(info=info, format=source.format, source=Path(os.path.abspath(src)), files=source.files, skipped=source.skipped)
