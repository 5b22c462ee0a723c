"""The tenant's own directory `<[files] root>/<tenant id>/`: the only place its file sources and sinks touch.

Paths are walked one directory at a time from the tenant's directory with `O_NOFOLLOW`: no `..`, no
absolute path, no symbolic link is ever followed, so nothing outside that directory is read or written,
whatever was placed in it after the schedule was created.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tierbatch.base.config import AppConfig
from tierbatch.schedules.source_rows import SourceError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone left there must not hang the worker (a regular file ignores it)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class PathRefused(SourceError):
    """A tenant's path that would leave its directory (absolute, `..`, a symbolic link) or is malformed."""


def has_glob(path: str) -> bool:
    return glob.has_magic(path)


def path_parts(path: str) -> list[str]:
    """The components of a tenant's relative path; PathRefused when it is absolute or climbs with `..`."""
    if "\x00" in path:
        raise PathRefused("must not contain NUL characters")
    if path.startswith("/") or os.path.isabs(path) or path.startswith("~"):
        raise PathRefused("must be relative to your own files directory (<[files] root>/<tenant id>/), "
                          "e.g. 'tickets/*.csv', not an absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathRefused("must not contain '..': a path stays inside your own files directory")
    if not parts:
        raise PathRefused("names no file")
    return parts


@dataclass(frozen=True, slots=True)
class TenantFiles:
    """`<root>/<tenant id>/`: the only directory a tenant's file sources and sinks can touch."""

    root: Path
    tenant_id: uuid.UUID

    @property
    def directory(self) -> Path:
        return self.root / str(self.tenant_id)

    def open_directory(self, create: bool = False) -> int:
        """A descriptor of the tenant's directory (made when `create`); the operator's root may be a link."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            name = str(self.tenant_id)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o750, dir_fd=root_fd)
            return _open_dir(root_fd, name, "your files directory")
        finally:
            os.close(root_fd)

    def probe(self, path: str, *, dynamic: Callable[[str], bool] = has_glob) -> None:
        """At creation: PathRefused when an existing part of `path` is a symbolic link. The parts from the
        first `dynamic` one (a glob, a placeholder) on are checked when the run reads or writes them."""
        parts = path_parts(path)
        current = self.directory
        for part in [None, *parts]:
            if part is not None:
                if dynamic(part):
                    return
                current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return  # not there yet: checked again when the run reads or writes it
            except OSError as exc:
                raise PathRefused(f"{path!r} cannot be checked ({exc.strerror})") from None
            if stat.S_ISLNK(mode):
                raise PathRefused(f"{path!r} goes through a symbolic link, which is not allowed: a path must "
                                  "stay inside your own files directory")


def _open_dir(parent_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise SourceError(f"{shown} does not exist") from None
    except OSError as exc:
        raise _refusal(parent_fd, name, shown, exc) from None


def _refusal(parent_fd: int, name: str, shown: str, exc: OSError) -> SourceError:
    """Why `name` could not be opened without following links: a link, a non-directory, or the OS reason."""
    try:
        mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
    except OSError:
        return SourceError(f"{shown}: {exc.strerror or 'cannot be opened'}")
    if stat.S_ISLNK(mode):
        return PathRefused(f"{shown} is a symbolic link, which is not allowed: a path must stay inside your "
                           "own files directory")
    if not stat.S_ISDIR(mode):
        return SourceError(f"{shown} is not a directory")
    return SourceError(f"{shown}: {exc.strerror or 'cannot be opened'}")


def walk_directories(dir_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """The descriptor of `parts` under `dir_fd`, each opened with O_NOFOLLOW (made when `create`).
    `dir_fd` stays open; the caller closes the result (which may be a new descriptor)."""
    current = os.dup(dir_fd)
    try:
        for index, part in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
            following = _open_dir(current, part, "/".join(parts[:index + 1]))
            os.close(current)
            current = following
        return current
    except BaseException:
        os.close(current)
        raise


def open_tenant_file(files: TenantFiles, path: str) -> IO[bytes]:
    """The regular file at `path` inside the tenant's directory, for reading, no link followed."""
    parts = path_parts(path)
    try:
        top = files.open_directory()
    except FileNotFoundError:
        raise SourceError(f"source file: {path} does not exist") from None
    try:
        parent = walk_directories(top, parts[:-1])
    finally:
        os.close(top)
    try:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise SourceError(f"source file: {path} does not exist") from None
        except OSError as exc:
            raise _refusal(parent, parts[-1], f"source file: {path}", exc) from None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"source file: {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _glob(dir_fd: int, parts: Sequence[str], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Matches of `parts` under `dir_fd`: symbolic links are invisible, hidden names need a leading `.`."""
    head, rest = parts[0], parts[1:]
    if has_glob(head):
        with os.scandir(dir_fd) as entries:
            names = sorted(e.name for e in entries if fnmatch.fnmatchcase(e.name, head)
                           and (head.startswith(".") or not e.name.startswith(".")))
    else:
        names = [head]
    for name in names:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            continue
        if not rest:
            if stat.S_ISREG(mode):
                yield (*prefix, name)
        elif stat.S_ISDIR(mode):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                yield from _glob(child, rest, (*prefix, name))
            finally:
                os.close(child)


def matching_files(files: TenantFiles, pattern: str) -> list[str]:
    """The tenant-relative paths a source path names: itself, or every match of its glob in name order."""
    parts = path_parts(pattern)
    if not has_glob(pattern):
        return ["/".join(parts)]
    try:
        top = files.open_directory()
    except FileNotFoundError:
        raise SourceError(f"source file: no file matches {pattern}") from None
    try:
        found = sorted("/".join(match) for match in _glob(top, parts, ()))
    finally:
        os.close(top)
    if not found:
        raise SourceError(f"source file: no file matches {pattern}")
    return found


FILES_DISABLED = ("file paths are disabled on this server: the operator enables them with [files] root = "
                  "\"/some/dir\" in the config (each tenant then reads and writes only <root>/<tenant id>/); "
                  "or upload the data (POST /v1/files, purpose user_data) and use source.file_id")


def tenant_files(config: AppConfig, tenant_id: uuid.UUID) -> TenantFiles | None:
    root = config.files.root
    return None if root is None else TenantFiles(root, tenant_id)
