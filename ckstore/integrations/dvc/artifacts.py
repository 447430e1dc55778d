"""The ``artifacts:`` entry of each published name in the repository's ``dvc.yaml``.

``dvc artifacts get REPO NAME [--rev v<k>.0.0]``, DVC Studio and GTO find a
model through an entry of the root ``dvc.yaml``::

    artifacts:
      best:
        path: models/best
        type: model
        desc: ckstore checkpoint, published by ckstore publish
        labels: [ckstore]

together with the annotated version tags ``best@v<k>.0.0`` (see
:mod:`ckstore.integrations.dvc.git`). The artifact name is the tag prefix:
``<name>``, or ``<dest>/<name>`` outside the default dest. GTO allows only
letters, digits, ``-``, ``_`` and ``/`` in a name (no dots, no leading or
trailing punctuation): a publish name outside that gets no entry, and its
result says so (``artifact`` is None).

``dvc.yaml`` may hold the user's stages and other artifacts: it is read as
untrusted YAML (bounded, no anchors or aliases, never through a symlink),
edited round-trip so everything else stays as written, and replaced
atomically. Only the entry of this name is ever written.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

from ...errors import DvcError
from ...storage import durable as _durable
from .files import read_capped, show

PROJECT_FILE = "dvc.yaml"
#: A ``dvc.yaml`` ckstore edits is a few KiB; one past this is not edited.
_CAP = 4 << 20
_EVENTS_CAP = 200_000
#: GTO's artifact name (gto.constants.name): what ``dvc artifacts`` accepts.
_GTO_NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-/_]*[a-zA-Z0-9])?", re.ASCII)


def artifact_name(prefix: str) -> str | None:
    """The artifact name for a version-tag prefix (``best``, ``exports/best``), or None when GTO cannot parse it."""
    return prefix if _GTO_NAME.fullmatch(prefix) else None


def entry(path: str) -> dict[str, Any]:
    """The entry of a published directory (``<dest>/<name>``, POSIX, relative to the repository)."""
    return {"path": path, "type": "model", "desc": "ckstore checkpoint, published by ckstore publish", "labels": ["ckstore"]}


def _yaml() -> Any:
    from ruamel.yaml import YAML  # comes with DVC

    yaml = YAML()  # round-trip: the user's comments, order and quoting stay
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def update(repo: str, name: str, value: dict[str, Any]) -> bool:
    """Set ``artifacts[name]`` in ``<repo>/dvc.yaml`` to ``value``; True when the file changed."""
    path = os.path.join(repo, PROJECT_FILE)
    try:
        raw = read_capped(path, _CAP, what=PROJECT_FILE)  # never through a symlink, never blocking on a FIFO
    except FileNotFoundError:
        raw = b""
    try:
        text = raw.decode("utf-8")
        data = _load(text) if text.strip() else None
    except DvcError:
        raise
    except Exception as exc:  # ruamel's scanner/parser errors, UnicodeDecodeError
        raise DvcError(f"{path}: unreadable dvc.yaml, not changed: {type(exc).__name__}: {show(str(exc)[:200])}") from None
    if data is None:
        from ruamel.yaml.comments import CommentedMap

        data = CommentedMap()
    if not hasattr(data, "setdefault"):
        raise DvcError(f"{path}: dvc.yaml is not a mapping; not changed")
    artifacts = data.setdefault("artifacts", {})
    if artifacts is None:
        artifacts = data["artifacts"] = {}
    if not hasattr(artifacts, "get"):
        raise DvcError(f"{path}: 'artifacts' in dvc.yaml is not a mapping; not changed")
    if _plain(artifacts.get(name)) == value:
        return False
    artifacts[name] = value
    out = io.StringIO()
    _yaml().dump(data, out)
    _durable.write_file_atomic(path, out.getvalue().encode("utf-8"), site="publish_dvc_yaml")
    return True


def _load(text: str) -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.events import AliasEvent

    # Anchors and aliases are refused on the event stream, before the document is built: an alias
    # bomb of a few hundred bytes expands to gigabytes (see ckstore.integrations.dvc.files).
    for count, event in enumerate(YAML(typ="safe", pure=True).parse(text)):
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise DvcError(f"{PROJECT_FILE}: YAML anchors and aliases are not supported; not changed")
        if count > _EVENTS_CAP:
            raise DvcError(f"{PROJECT_FILE}: too many YAML nodes; not changed")
    return _yaml().load(text)


def _plain(value: Any) -> Any:
    """``value`` as plain dicts and lists (ruamel's round-trip types compare by content, but not to dicts reliably)."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
