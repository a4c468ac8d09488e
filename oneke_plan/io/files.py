"""Writing files whose paths users give, without ever destroying a file the tool did not write.

The rules both CLIs follow (README "When things go wrong"):
- an existing path is replaced only if it is a regular file with a single link: never a folder, device node,
  FIFO, socket or symbolic link, and never a file with other hard links (replacing it would cut them off);
- only if it was first validated as the tool's own earlier output, or the user passed --overwrite (an existing
  empty file is nobody's output: it may be a placeholder, or a name another program is waiting on);
- new content goes to a temporary file in the same folder, is fsync'd, and moves over the target with
  os.replace, so a crash leaves the old file or the new one, never a mix;
- every OSError while writing is one BadInput line naming the path (disk full, read-only folder, permissions).

A leaf module: standard library, errors and core.stops only.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from oneke_plan.core.errors import BadInput
from oneke_plan.core.stops import held


def os_error(path: str | os.PathLike[str], action: str, exc: OSError, hint: str = "") -> BadInput:
    """One line for an OSError: the path, what failed, the system's reason (e.g. 'No space left on device'), and
    what to do."""
    reason = exc.strerror or str(exc)
    return BadInput(f"{path}: cannot {action} ({reason})" + (f"; {hint}" if hint else ""))


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def require_folder(path: str | os.PathLike[str], flag: str = "") -> None:
    """BadInput unless the folder `path` would be written in exists: the one wording for every file the tools write
    (`flag`: the option that named `path`, if any)."""
    folder = Path(path).parent
    if not folder.is_dir():
        where = f"{flag} {path}" if flag else f"{path}"
        raise BadInput(f"{where}: folder {folder} does not exist; create it first")


def replaceable_stat(path: str | os.PathLike[str], flag: str) -> os.stat_result | None:
    """The lstat of `path` if it is a regular file with one link, None if it does not exist; BadInput otherwise,
    and when its folder does not exist (require_folder).

    Says nothing about whose file it is: callers check that (their own output, or --overwrite) before replacing.
    """
    require_folder(path, flag)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(path, "be examined", exc) from None
    kind = _kind(info.st_mode)
    if kind is not None:
        raise BadInput(f"{flag} {path}: is {kind}, not a regular file; it is never replaced: choose another path")
    if info.st_nlink > 1:
        raise BadInput(
            f"{flag} {path}: has {info.st_nlink} hard links; replacing it would cut the others off: choose another path"
        )
    return info


def same_file(before: os.stat_result | None, path: str | os.PathLike[str]) -> bool:
    """Whether `path` is still what `before` (an lstat, or None for absent) described."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return before is None
    return before is not None and (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the open file `fd` (os.write may write less than asked) and fsync it, so it is on
    disk when this returns; an OSError is the caller's to word."""
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `folder` durable (where the filesystem allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the data itself was fsync'd
    finally:
        os.close(fd)


def _new_file_mode(replaced: os.stat_result | None) -> int:
    """The permissions a replaced file had, or what open() would give a new one (0o666 less the umask):
    mkstemp's 0o600 would hide the output from the user's other accounts and groups."""
    if replaced is not None:
        return stat.S_IMODE(replaced.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(
    path: str | os.PathLike[str], chunks: Iterable[bytes], expected: os.stat_result | None = None, hint: str = ""
) -> None:
    """Write `chunks` to `path` through a temporary file in the same folder and os.replace.

    `expected` is what the caller validated (lstat of the existing file, or None for "absent"): if the path changed
    since, nothing is replaced. Failures are BadInput naming the path (and `hint`: what to do); the temporary
    file never stays behind. A stop signal waits for the end (core.stops.held): the old file or the new one.
    """
    with held():
        _write_atomic(Path(path), chunks, expected, hint)


def _write_atomic(path: Path, chunks: Iterable[bytes], expected: os.stat_result | None, hint: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(path.parent, "create a file in this folder", exc, hint) from None
    try:
        os.fchmod(fd, _new_file_mode(expected))
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if not same_file(expected, path):
            raise BadInput(
                f"{path}: changed while this command ran (another program wrote it): it was left as is"
                + (f"; {hint}" if hint else "")
            )
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(path, "be written", exc, hint) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def starts_with(path: str | os.PathLike[str], pattern: bytes) -> bool:
    """Whether the file at `path` starts with the regular expression `pattern` (its first 256 bytes, read as bytes
    and never parsed: whatever file a user names, looking costs nothing). False when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return False
    return re.match(pattern, head) is not None
