"""Writing files whose paths users give, without ever destroying a file the tool did not write.

The rules both CLIs follow (README "When things go wrong"), each path checked by output_target before anything is
written:
- an existing path is replaced only if it is a regular file with a single link: never a folder, device node,
  FIFO, socket or symbolic link, and never a file with other hard links (replacing it would cut them off);
- only if it looks like the tool's own earlier output of that kind (a profile's header, the picture's mark, an
  answer line first), or it is empty and the user passed --overwrite: --overwrite is consent to replace an earlier
  output of the tool (or a placeholder), never anyone else's file (an existing empty file is nobody's output: it
  may be a name another program is waiting on, so it too needs --overwrite);
- never a file or folder the command reads (Reads: the model's folder or GGUF file, the profile, the adapter, the
  inventory, the offload folder, the input, a schema or example file), compared by path and by inode, and nothing is
  written anywhere inside a folder it reads, nor inside a model's or adapter's folder it does not read (a new
  model.safetensors.index.json, tokenizer.json or adapter_model.bin there changes what loads), nor inside a Hugging
  Face cache;
- new content goes to a temporary file in the same folder, is fsync'd, and moves over the target with
  os.replace, so a crash leaves the old file or the new one, never a mix;
- every OSError while writing is one BadInput line naming the path (disk full, read-only folder, permissions).

And for the small files a model folder points with (a hub cache's refs/main, a tokenizer.model): `read_regular`
reads one only if it is a regular file within a size bound, asked of the file system before it is opened, so a FIFO
never blocks, /dev/zero is never read and a 4 GiB sparse file costs nothing.

A leaf module: standard library, errors, sizes and core.stops only.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import format_bytes
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

def too_large(path: str | os.PathLike[str], limit: int, remedy: str, size: int | None = None) -> BadInput:
    """The one wording for a file over its bound (`size`: its size when known, from fstat)."""
    its = f" (it is {format_bytes(size)})" if size is not None else ""
    return BadInput(f"{path}: larger than {format_bytes(limit)}{its}, more than any file of its kind; {remedy}")


def _refuse_irregular(path: str | os.PathLike[str], info: os.stat_result, limit: int, remedy: str) -> None:
    """BadInput unless `info` (the stat of `path`, links followed) is a regular file of at most `limit` bytes."""
    kind = _kind(info.st_mode)
    if kind is not None:
        if os.path.islink(path):
            kind = f"a symbolic link to {os.path.realpath(path)}, {kind}"
        raise BadInput(f"{path}: is {kind}, not a regular file; {remedy}")
    if info.st_size > limit:
        raise too_large(path, limit, remedy, info.st_size)


def regular_file(path: str | os.PathLike[str], limit: int, remedy: str) -> os.stat_result | None:
    """The stat of `path` if it is a regular file of at most `limit` bytes (a symbolic link followed: a hub-cache
    snapshot's files are links into its blobs), None if nothing is there. BadInput, naming the path, what it is
    and `remedy`, for a link to nothing, a folder, FIFO, device or socket, or a larger file: asked of the file
    system alone, nothing is opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadInput(
                f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist; {remedy}"
            ) from None
        return None
    except OSError as exc:  # a loop of links, a permission on the way
        raise os_error(path, "be examined", exc, remedy) from None
    _refuse_irregular(path, info, limit, remedy)
    return info


def read_regular(path: str | os.PathLike[str], limit: int, remedy: str) -> bytes | None:
    """The bytes of `path` if it is a regular file of at most `limit` bytes (regular_file), None if nothing is
    there. It is opened without blocking and checked again through the open descriptor, so a file swapped for a
    FIFO or grown in between is refused too, and at most `limit` + 1 bytes are ever read."""
    if regular_file(path, limit, remedy) is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(path, "be read", exc, remedy) from None
    try:
        _refuse_irregular(path, os.fstat(fd), limit, remedy)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise os_error(path, "be read", exc, remedy) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise too_large(path, limit, remedy)
    return data


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

    Says nothing about whose file it is: output_target, which calls it, checks that before anything is replaced.
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


# ---------------------------------------------------------------- what a command reads is never an output


@dataclass(frozen=True)
class Read:
    """One file or folder a command reads. `what` names it in messages ("the profile", "the model's folder")."""

    path: Path
    what: str
    folder: bool  # a folder: nothing is written anywhere inside it


MAX_FOLDER_ENTRIES = 10_000
"""How many entries of a read folder are looked at for a link to the output (a model folder has tens; an offload
folder, one per offloaded tensor): past that, a folder is still compared by path."""


@dataclass(frozen=True)
class Reads:
    """Every file and folder one command reads: the api layer gathers them (api.checks.model_reads, RunContext.reads)
    and output_target refuses an output that is one of them or inside one of the folders."""

    items: tuple[Read, ...] = ()

    def file(self, path: str | os.PathLike[str] | None, what: str) -> Reads:
        return self if path is None else Reads((*self.items, Read(Path(path), what, False)))

    def folder(self, path: str | os.PathLike[str] | None, what: str) -> Reads:
        return self if path is None else Reads((*self.items, Read(Path(path), what, True)))

    def check(self, path: str | os.PathLike[str], flag: str) -> None:
        """BadInput if writing `path` would replace or add to something this command reads: the same path once
        links are resolved, the same file (inode: a hard or symbolic link to it), or a path inside a read folder
        (existing or not: a new file in a model folder changes the model too)."""
        target = Path(os.path.realpath(path))
        identity = _identity(path)
        for item in self.items:
            real = Path(os.path.realpath(item.path))
            if target == real or (identity is not None and identity == _identity(item.path)):
                raise BadInput(
                    f"{flag} {path}: is {item.what} {item.path}, which this command reads; choose another path"
                )
            if not item.folder:
                continue
            if real in target.parents or (identity is not None and identity in _identities_in(real)):
                verb = "is a file of" if identity is not None else "would be written into"
                raise BadInput(
                    f"{flag} {path}: {verb} {item.what} {item.path}, which this command reads (nothing is written "
                    "there); choose a path outside it"
                )


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of what `path` names, links followed; None when it does not exist or cannot be examined."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _identities_in(folder: Path) -> set[tuple[int, int]]:
    """(device, inode) of the files under `folder`, links followed (a Hugging Face snapshot's files are links into
    its blobs), at most MAX_FOLDER_ENTRIES entries looked at; symbolic links to folders are not entered."""
    found: set[tuple[int, int]] = set()
    pending, seen = [folder], 0
    while pending and seen < MAX_FOLDER_ENTRIES:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_FOLDER_ENTRIES:
                        break
                    try:
                        info = entry.stat(follow_symlinks=True)
                        if stat.S_ISDIR(info.st_mode):
                            if not entry.is_symlink():
                                pending.append(Path(entry.path))
                            continue
                    except OSError:
                        continue
                    found.add((info.st_dev, info.st_ino))
        except OSError:
            continue
    return found


ADAPTER_MARKER = "adapter_config.json"
MODEL_MARKERS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "generation_config.json",
)
"""Beside a config.json, any of these makes a folder a model's: peft's and transformers' own file names."""
HUB_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")


def model_folder(folder: str | os.PathLike[str]) -> str | None:
    """What `folder` is, in words, when it is a model's or an adapter's folder (by the files peft and transformers
    save there: a fixed list of names, so looking costs a few stats) or lies in a Hugging Face cache; None
    otherwise."""
    real = Path(os.path.realpath(folder))
    if any(part.startswith(HUB_CACHE_PREFIXES) for part in real.parts):
        return "a folder of the Hugging Face cache"
    if (real / ADAPTER_MARKER).is_file():
        return f"an adapter's folder (it holds {ADAPTER_MARKER})"
    if (real / "config.json").is_file():
        beside = next((name for name in MODEL_MARKERS if (real / name).exists()), None)
        if beside is not None:
            return f"a model's folder (it holds config.json and {beside})"
    return None


def output_target(
    path: str | os.PathLike[str],
    flag: str,
    reads: Reads,
    ours: Callable[[Path], bool] | None,
    what: str,
    overwrite: bool = False,
    example: str = "out",
) -> os.stat_result | None:
    """The one check of every path a command writes, before anything is written: the lstat of `path` when it may
    be replaced, None when it does not exist; BadInput, touching nothing, otherwise.

    Refused, with or without --overwrite (`overwrite`): a file or folder the command reads, or a path inside a folder
    it reads (Reads.check); a path inside a model's or adapter's folder or the Hugging Face cache (model_folder); a
    folder, a link, a device, a FIFO, a socket, a file with other hard links (replaceable_stat). An existing regular
    file is then replaced only if `ours(path)` (it looks like the tool's earlier output: `what`, e.g. "an output of
    oneke-run"), or it is empty and `overwrite`. `ours` None: the caller validates what it replaces itself.
    `example`: a file name for the message when `path` is a folder.
    """
    path = Path(path)
    reads.check(path, flag)
    foreign = model_folder(path.parent)
    if foreign is not None:
        verb = "is a file of" if os.path.lexists(path) else "would be written into"
        raise BadInput(f"{flag} {path}: {verb} {foreign}; no output goes there: choose a path outside it")
    if path.is_dir() and not path.is_symlink():
        raise BadInput(f"{flag} {path}: is a folder; give a file name such as {path / example}")
    existing = replaceable_stat(path, flag)
    if existing is None or ours is None or ours(path):
        return existing
    if existing.st_size == 0:
        if overwrite:
            return existing
        raise BadInput(
            f"{flag} {path}: exists and is empty, so it is not {what}; pass --overwrite to replace it, or choose "
            "another path"
        )
    raise BadInput(
        f"{flag} {path}: exists and is not {what}, so it is left as is (--overwrite replaces only that, or an empty "
        "file): choose another path, or move it away"
    )


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
