"""A passthrough FUSE filesystem that imitates the lock and fsync behaviour of shared filesystems.

Run as a process (``python tests/fusefs.py BACKING MOUNTPOINT --flock MODE --fsync MODE``); it stays in the
foreground until unmounted. Every call is passed to BACKING, except:

``--flock``
    ``kernel``: no flock handler, so the kernel keeps flock locks itself, like NFS mounted with
    ``local_lock=flock`` or Lustre with ``-o localflock``: they exclude processes of this host only.
    ``enosys``: flock fails with ENOSYS, like Lustre mounted without ``flock``/``localflock``.
    ``enolck``: flock fails with ENOLCK, like NFSv3 whose lock manager (``lockd``/``rpc.statd``) is unreachable.
``--fsync``
    ``pass``: fsync reaches the backing file. ``drop``: fsync returns success without syncing (a server that
    acknowledges COMMIT from a volatile cache). ``eio``: fsync fails with EIO.
"""

from __future__ import annotations

import argparse
import errno
import os

import mfusepy as fuse


class Passthrough(fuse.Operations):
    use_ns = True

    def __init__(self, backing: str, *, flock_mode: str, fsync_mode: str) -> None:
        self.backing = os.path.realpath(backing)
        self.fsync_mode = fsync_mode
        self.flock_errno = {"enosys": errno.ENOSYS, "enolck": errno.ENOLCK}.get(flock_mode)
        if self.flock_errno is None:
            # mfusepy registers only the handlers a class defines: without one, the kernel keeps flock locks locally.
            self.flock = None

    def _full(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def flock(self, path: str, fh: int, op: int) -> int:
        raise fuse.FuseOSError(self.flock_errno)

    def getattr(self, path: str, fh: int | None = None) -> dict:
        st = os.lstat(self._full(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
        out = {key: getattr(st, key) for key in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._full(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._full(target))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._full(source), self._full(target))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._full(old), self._full(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags & ~getattr(os, "O_DIRECT", 0))

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if self.fsync_mode == "eio":
            raise fuse.FuseOSError(errno.EIO)
        if self.fsync_mode == "pass":
            os.fsync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        if self.fsync_mode == "eio":
            raise fuse.FuseOSError(errno.EIO)
        if self.fsync_mode == "pass":
            fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--flock", choices=("kernel", "enosys", "enolck"), default="kernel")
    parser.add_argument("--fsync", choices=("pass", "drop", "eio"), default="pass")
    args = parser.parse_args()
    ops = Passthrough(args.backing, flock_mode=args.flock, fsync_mode=args.fsync)
    fuse.FUSE(ops, args.mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    main()
