"""Content-addressed files under MEDIA_ROOT, written atomically (temp file + rename); and
the check of a path a command writes its output to (``out_path_check``)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings


def media_path(name: str) -> Path:
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ValueError(f"media name escapes MEDIA_ROOT: {name!r}")
    return path


def scan_file_name(sha256: str, ext: str) -> str:
    return f"scans/{sha256[:2]}/{sha256}{ext}"


def preview_file_name(sha256: str) -> str:
    return f"previews/{sha256[:2]}/{sha256}.png"


def write_atomic(name: str, data: bytes) -> bool:
    """Write ``data`` to media ``name`` unless it is already there.

    Returns True when this call created the file (so a failed import knows what
    to remove). Content addressing makes an existing file identical by design.
    """
    path = media_path(name)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def remove_if_unreferenced(name: str) -> None:
    """Delete a media file no Scan row points at (used to roll back a failed import)."""
    from annotator.models import Scan

    if Scan.objects.filter(file=name).exists() or Scan.objects.filter(preview=name).exists():
        return
    media_path(name).unlink(missing_ok=True)


# --- a path a command writes its output to (``--out``) ----------------------------------------


class OutPathError(ValueError):
    """A path given to write to is not one we may write; ``str(exc)`` says why."""


def _kind_of(mode: int) -> str:
    return ("device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "named pipe (fifo)" if stat.S_ISFIFO(mode) else
            "socket" if stat.S_ISSOCK(mode) else "special file")


def out_path_check(path: str | Path, *, folder: bool = False, option: str = "--out") -> Path:
    """``path`` checked before anything is written to it, and again just before the finished
    output is moved there. A file output may be new or an existing regular file (which the
    write then replaces whole); a folder output may be new or an empty folder. Refused with
    the reason (OutPathError): a symbolic link, a device, a fifo or a socket, a folder where a
    file goes (and the other way round), and a path whose parent is not an existing folder
    this process can create files in (tried for real: a permission check alone says yes to
    root in /proc). Nothing is made on the way: no missing parent folder is created."""
    path = Path(path)
    what = "folder" if folder else "file"
    if path.name in ("", ".", ".."):
        raise OutPathError(f"{str(path)!r} names no {what}: give {option} a {what} name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OutPathError(f"{parent} is not an existing folder: make it first, or give "
                           f"{option} a path in one")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutPathError(f"cannot write {path}: {exc.strerror or exc}") from None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise OutPathError(f"{path} is a symbolic link: give {option} a path that is not "
                               "one (neither the link nor what it points to is replaced)")
        if folder:
            if stat.S_ISREG(mode):
                raise OutPathError(f"{path} is a file, not a folder: give {option} a new folder")
            if not stat.S_ISDIR(mode):
                raise OutPathError(f"{path} is a {_kind_of(mode)}, not a folder: give "
                                   f"{option} a new folder")
            if any(path.iterdir()):
                raise OutPathError(f"{path} is not empty: export into a new folder")
        elif stat.S_ISDIR(mode):
            raise OutPathError(f"{path} is a folder: give {option} a file name")
        elif not stat.S_ISREG(mode):
            raise OutPathError(f"{path} is a {_kind_of(mode)}, not a regular file: give "
                               f"{option} a file name")
    try:                                # can this process really create a file there?
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutPathError(f"cannot write in {parent}: {exc.strerror or exc}") from None
    return path


def out_text_write(path: Path, text: str, *, option: str = "--out") -> None:
    """Write ``text`` to ``path`` (checked with ``out_path_check``) under a temporary name
    beside it, then check ``path`` again and rename: a failed write leaves no half file, and
    an earlier regular file at ``path`` stays as it was until the new one replaces it.
    Raises OutPathError (or OSError: the disk is full)."""
    partial = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.absolute().parent, newline="",
                                         prefix=f".{path.name}.", suffix=".partial",
                                         delete=False, encoding="utf-8") as handle:
            partial = Path(handle.name)
            handle.write(text)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(partial, 0o666 & ~mask)            # as a plain write would make it
        out_path_check(path, option=option)
        os.replace(partial, path)
        partial = None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


@contextmanager
def out_folder_built(out: Path):
    """A command's output folder, built in a temporary folder beside ``out`` (yielded) and
    renamed into place once whole, ``out`` checked again first (still new or empty, not a
    link): a failure leaves nothing behind. Raises OutPathError or OSError."""
    work = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.partial-"))
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(work, 0o777 & ~mask)               # as a plain mkdir would make it
        yield work
        out_path_check(out, folder=True)
        if out.is_dir():
            out.rmdir()                 # empty (checked): the finished folder takes its place
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
