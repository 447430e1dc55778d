"""Which mount a store is on, and whether its file locks exclude other hosts.

NFS mounted with ``nolock`` or ``local_lock=flock``/``all``, and Lustre mounted with ``localflock``, keep
``flock`` locks on the client: the call succeeds, and a writer on another host takes "the same" lock too.
No lock call can tell, so the writer lock reads the mount's options from ``/proc/self/mountinfo`` and warns
(:class:`HostLocalLockWarning`) that one writer per store then holds per host only. It warns rather than
refuses because a store written from one node of such a cluster is safe (docs/distributed.md, "Shared
filesystems").
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"


class HostLocalLockWarning(RuntimeWarning):
    """The store's mount keeps file locks on this host: writers on other hosts are not excluded."""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash in paths as octal (\040 ...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str, mountinfo: str) -> tuple[str, str, set[str]] | None:
    """(mount point, filesystem type, mount and superblock options) of the mount holding ``path``, or None."""
    best: tuple[str, str, set[str]] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        # Later lines are later mounts: on an equal mount point the last one is the visible one.
        if inside and (best is None or len(point) >= len(best[0])):
            options = set(fields[5].split(",")) | set(fields[sep + 3].split(",") if len(fields) > sep + 3 else ())
            best = (point, fields[sep + 1], options)
    return best


def host_local_locks(path: str, mountinfo: str | None = None) -> str | None:
    """Why ``flock`` on ``path`` excludes only processes of this host (the mount option), or None if it does not."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8", errors="replace") as fh:
                mountinfo = fh.read()
        except OSError:  # not Linux, or /proc not mounted: nothing to learn
            return None
    mount = mount_of(os.path.realpath(path), mountinfo)
    if mount is None:
        return None
    point, fstype, options = mount
    if fstype in ("nfs", "nfs4"):
        for option in ("nolock", "local_lock=flock", "local_lock=all"):
            if option in options:
                return f"{fstype} mount {point} has {option}"
    if fstype == "lustre" and "localflock" in options:
        return f"lustre mount {point} has localflock"
    return None
