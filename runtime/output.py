"""Output folders (compress, decompress, merged exports): built beside the target under a private name and moved
into place by one atomic rename, so no reader sees half a model and nothing that was on disk is lost.

- The target is checked at the start (it exists and ``overwrite`` was not given: refused; it is, holds or sits
  inside a source folder: refused even with ``overwrite``) and again at the rename itself, which cannot replace
  anything without ``overwrite``: a folder created at the target during a run, or a concurrent run into the same
  target, is never deleted. On Linux the rename is ``renameat2`` (RENAME_NOREPLACE; with ``overwrite``,
  RENAME_EXCHANGE swaps the folders in one step, so the target is never missing, then the old one is deleted);
  elsewhere a plain rename, which refuses a non-empty folder in the way, and for ``overwrite`` the old folder is
  renamed aside first and deleted once the new one is in.
- The work folder is ``.{target}.partial-{host}-{pid}-{random}``. A run deletes the leftovers of runs into the
  same target that were killed (SIGKILL, power loss): those whose process on this host is gone, or untouched for
  `STALE_AFTER_S`; a live concurrent run's folder is kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from dfloat.errors import ModelSourceError, OutputExistsError, OutputWriteError
from dfloat.storage import default_mode, write_failure

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a partial folder untouched this long belongs to no live run
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


def partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def check_target(out: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute target folder, refused when it exists (without ``overwrite``) or when it is, holds or sits
    inside one of ``sources`` (replacing it would delete the input; inside it, the output would become part of
    the model folder)."""
    out = Path(out).expanduser().resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if out == source or out in source.parents or source in out.parents:
            how = "is" if out == source else "holds" if out in source.parents else "is inside"
            raise ModelSourceError(
                f"{out}: the output folder {how} the source folder {source}; choose an output outside it"
            )
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(path: Path, prefix: str, now: float) -> bool:
    match = re.fullmatch(r"([0-9a-f]{8})-(\d+)-.+", path.name[len(prefix) :])
    if match and match.group(1) == _host_tag() and not _pid_alive(int(match.group(2))):
        return True  # its run on this machine is gone
    try:
        touched = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.iterdir())])
    except OSError:
        return False
    return now - touched > STALE_AFTER_S


def clean_stale_partials(out: Path) -> list[Path]:
    """Delete the work folders that killed runs into ``out`` left behind; returns them."""
    prefix, now, cleaned = partial_prefix(out), time.time(), []
    if not out.parent.is_dir():
        return cleaned
    for path in out.parent.iterdir():
        if (
            path.name.startswith(prefix)
            and path.is_dir()
            and not path.is_symlink()
            and _is_stale(path, prefix, now)
        ):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, the work folder of a run that was killed", path)
            cleaned.append(path)
    return cleaned


def new_partial(out: Path) -> Path:
    """A fresh work folder beside ``out`` (after cleaning stale ones), with the permissions of a plain mkdir."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(out)}{_host_tag()}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with flags; False when this system or file system has no renameat2 (then nothing was done)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


class _Occupied(Exception):
    """Something is at the target."""


def _rename_no_replace(tmp: Path, out: Path) -> None:
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _Occupied from None
    if out.exists() or out.is_symlink():
        raise _Occupied
    try:
        os.rename(tmp, out)  # refuses a non-empty folder or a file in the way (an empty one is replaced)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _Occupied from None
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace what is at ``out`` by ``tmp``, deleting the old one only once the new one is in place."""
    try:
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            _remove(tmp)  # the old folder, now under the work folder's name
            return
    except FileNotFoundError:  # it went away meanwhile
        return move_into_place(tmp, out, overwrite=True)
    aside = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(out, aside)
    except FileNotFoundError:
        return move_into_place(tmp, out, overwrite=True)
    try:
        _rename_no_replace(tmp, out)
    except _Occupied:
        raise OutputExistsError(
            f"{out}: something was created there while the old folder was moved aside; both are kept (the old "
            f"folder as {aside}), this run's output is discarded"
        ) from None
    _remove(aside)


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``. Without ``overwrite`` nothing at ``out`` is ever replaced:
    OutputExistsError, whenever it appeared; with it, the old ``out`` is deleted once the new one is in place."""
    try:
        return _rename_no_replace(tmp, out)
    except _Occupied:
        if not overwrite:
            raise OutputExistsError(
                f"{out}: appeared while this run was writing (another run or program created it) and was left "
                "as it is; pass overwrite=True / --overwrite to replace it"
            ) from None
    _swap_in(tmp, out)


@contextlib.contextmanager
def building(out: Path, overwrite: bool) -> Iterator[Path]:
    """A work folder to write into; when the block ends it becomes ``out`` (`move_into_place`), and on any error
    or interrupt it is deleted."""
    tmp = new_partial(out)
    try:
        yield tmp
        move_into_place(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk in a write that does not name its file (Path.write_text): name the output
        if e.errno in _DISK_FULL and e.filename is None and not isinstance(e, OutputWriteError):
            raise write_failure(out, e) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
