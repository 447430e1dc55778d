"""Reading what a git + DVC repository and its remote hand us, as untrusted input.

A cloned repository, its ``.dvc`` files and the DVC remote it names may all
come from someone else. Everything here is bounded and checked before any path
is built from it:

* files are opened without following symlinks and without blocking (a FIFO
  planted as ``best.dvc`` must not hang ``ckstore pull``), checked to be
  regular, and read up to a cap;
* ``.dvc`` files are YAML: anchors and aliases are refused before the document
  is built, because a 459-byte alias bomb expands to hundreds of MiB;
* a DVC directory object (``<md5>.dir``, the JSON listing of a tracked
  directory) is checked entry by entry: every ``md5`` is 32 lowercase hex
  digits and every ``relpath`` a plain relative path. dvc-data builds cache
  and remote paths by string concatenation (``cache + "/" + md5[:2] + "/" +
  md5[2:]``), so an ``md5`` of ``../../home/victim/.bashrc`` would otherwise
  make a fetch write, and a cleanup delete, files outside the cache;
* directories ckstore is about to write into are walked component by
  component with ``lstat``: a symlinked ``models/`` in a cloned repository
  would otherwise carry a publish outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ...errors import CheckpointNotFoundError, CheckpointReadError, DvcError, InvalidArgumentError
from ...storage import safeio as _safeio

#: A ``.dvc`` file written by DVC is a few hundred bytes.
DVC_FILE_CAP = 1 << 20
#: A directory object lists one checkpoint: a manifest and its tensor files (~150 bytes an entry).
DIR_OBJECT_CAP = 64 << 20
#: YAML events in a ``.dvc`` file (one output has about 20).
_YAML_EVENTS_CAP = 10_000

_MD5 = re.compile(r"[0-9a-f]{32}")
_DIR_MD5 = re.compile(r"[0-9a-f]{32}\.dir")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def show(text: object) -> str:
    """``text`` for a message: quoted, with control characters and escapes shown as ``\\x1b``."""
    return ascii(text) if isinstance(text, str) else ascii(str(text))


def has_control(text: str) -> bool:
    """True if ``text`` holds a control character (newline, escape, NUL, C1 controls)."""
    return bool(_CONTROL.search(text))


def read_capped(path: str, cap: int, *, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` of them; never follows a link, never blocks.

    Read through ``ckstore.storage.safeio`` like every store file. Raises
    FileNotFoundError when missing (callers turn it into their error),
    DvcError for anything that is not a plain regular file within the cap.
    """
    try:
        return _safeio.read_small(path, cap=cap, what=what, error=lambda reason: DvcError(f"{path}: {reason}"))
    except CheckpointReadError as exc:
        raise DvcError(f"{path}: cannot read {what}: {exc}") from None


def read_dvc_file(path: str) -> tuple[str, str]:
    """``(md5, path)`` of the single directory output of a ``.dvc`` file, read as untrusted YAML."""
    try:
        raw = read_capped(path, DVC_FILE_CAP, what=".dvc file")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such .dvc file (not published, or not checked out at this revision)") from None
    return parse_dvc_file(raw, path)


def parse_dvc_file(raw: bytes, path: str) -> tuple[str, str]:
    """``(md5, path)`` of the ``.dvc`` file bytes ``raw`` (from the workspace or a git revision); ``path`` names it in messages."""
    if len(raw) > DVC_FILE_CAP:
        raise DvcError(f"{path}: .dvc file is {len(raw)} bytes, more than the {DVC_FILE_CAP}-byte cap")
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.events import AliasEvent
    except ImportError as exc:  # ruamel.yaml comes with DVC
        from .ops import INSTALL_HINT

        raise DvcError(INSTALL_HINT) from exc
    try:
        text = raw.decode("utf-8")
        # Anchors and aliases first, on the event stream: building the document would expand
        # an alias bomb (each level doubling) before any size check could see it.
        for count, event in enumerate(YAML(typ="safe", pure=True).parse(text)):
            if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
                raise DvcError(f"{path}: YAML anchors and aliases are not allowed in a .dvc file")
            if count > _YAML_EVENTS_CAP:
                raise DvcError(f"{path}: too many YAML nodes for a .dvc file")
        data = YAML(typ="safe", pure=True).load(text)
    except DvcError:
        raise
    except Exception as exc:  # ruamel's scanner/parser errors, UnicodeDecodeError
        raise DvcError(f"{path}: unreadable .dvc file: {type(exc).__name__}: {show(str(exc)[:200])}") from None
    try:
        (out,) = data["outs"]
        md5, rel = out["md5"], out["path"]
    except (TypeError, KeyError, ValueError):
        raise DvcError(f"{path}: not a single-output .dvc file written by ckstore publish") from None
    if not isinstance(md5, str) or not isinstance(rel, str):
        raise DvcError(f"{path}: not a single-output .dvc file written by ckstore publish")
    if not _DIR_MD5.fullmatch(md5):
        raise DvcError(f"{path}: output {show(rel)} is not a directory (md5 {show(md5)})")
    if has_control(rel) or "/" in rel or "\\" in rel or rel in ("", ".", ".."):
        raise DvcError(f"{path}: output path {show(rel)} is not a plain name next to the .dvc file")
    return md5, rel


def parse_dir_object(raw: bytes, *, where: str) -> dict[str, str]:
    """``{relpath: md5}`` of a DVC directory object, every entry checked (see the module docstring).

    ``where`` names the object in messages. Nothing is fetched or opened here:
    callers check the listing *before* any path is built from it.
    """
    try:
        listing = json.loads(raw)
    except (ValueError, RecursionError):
        raise DvcError(f"{where}: not a DVC directory listing (not JSON)") from None
    if not isinstance(listing, list):
        raise DvcError(f"{where}: not a DVC directory listing (not a JSON list)")
    entries: dict[str, str] = {}
    for entry in listing:
        if not isinstance(entry, dict):
            raise DvcError(f"{where}: not a DVC directory listing (an entry is not an object)")
        rel, md5 = entry.get("relpath"), entry.get("md5")
        if not isinstance(rel, str) or not isinstance(md5, str):
            raise DvcError(f"{where}: an entry has no string relpath and md5")
        check_relpath(rel, where=where)
        if not _MD5.fullmatch(md5):
            raise DvcError(f"{where}: entry {show(rel)} has md5 {show(md5)}, not 32 lowercase hex digits; nothing fetched")
        if rel in entries:
            raise DvcError(f"{where}: entry {show(rel)} is listed twice; nothing fetched")
        entries[rel] = md5
    return entries


def check_relpath(rel: str, *, where: str) -> None:
    """A plain relative POSIX path: no absolute, no ``..``/``.``/empty parts, no backslash, no control characters."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or has_control(rel)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise DvcError(f"{where}: entry {show(rel)} is not a plain relative path; nothing fetched")


def check_real_dirs(root: str, path: str, *, what: str) -> None:
    """Every existing directory from ``root`` down to ``path`` is a real directory, not a symlink.

    ``root`` itself may be reached through symlinks (the user chose it); below
    it, a symlinked component planted in a cloned repository (``models ->
    /home/victim``) would carry writes outside. Missing components are fine:
    ckstore creates them.
    """
    rel = os.path.relpath(path, root)
    if rel == ".":
        return
    if rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
        raise InvalidArgumentError(f"{what} {path} is not inside the repository {root}")
    here = root
    for part in rel.split(os.sep):
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise InvalidArgumentError(f"{here} is a symlink; ckstore never writes through a symlink inside a repository ({what})")
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgumentError(f"{here} is not a directory ({what})")
