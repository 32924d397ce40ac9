"""Vassal output to files (``--logs-dir``), one per vassal, rotated by size.

``DIR/NAME.log`` holds the lines of vassal NAME, each with its time; when a
write would take it past *max_bytes*, ``NAME.log`` becomes ``NAME.log.1``
(``.1`` becomes ``.2``, ... up to *backups*, the oldest is removed) and a new
file starts. A file that cannot be written is logged once and skipped; the
vassal and the emperor go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import IO

__all__ = ["LogFiles", "file_name"]

log = logging.getLogger(__name__)


def file_name(vassal: str) -> str:
    """A file name for *vassal* inside the logs directory (never a path out of it)."""
    safe = vassal.replace("/", "_").replace("\0", "_")
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return (safe or "_") + ".log"


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


class LogFiles:
    """*directory* (``--logs-dir``) for every vassal, or None; a vassal's own
    ``log-file`` (:meth:`configure`) takes precedence."""

    def __init__(
        self, directory: str | None, max_bytes: int = 10 * 1024 * 1024, backups: int = 5
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups
        self._open: dict[str, tuple[IO[bytes], int]] = {}
        self._failed: set[str] = set()
        self._own: dict[str, tuple[str, int, int]] = {}

    def configure(
        self, vassal: str, path: str | None, max_bytes: int | None, backups: int | None
    ) -> None:
        """The vassal's own ``log-file`` (None: the logs directory, if any)."""
        if path is None:
            if self._own.pop(vassal, None) is not None:
                self.close(vassal)
            return
        own = (path, max_bytes or self.max_bytes, self.backups if backups is None else backups)
        if self._own.get(vassal) != own:
            self.close(vassal)
            self._own[vassal] = own

    def path(self, vassal: str) -> str | None:
        own = self._own.get(vassal)
        if own is not None:
            return own[0]
        return None if self.directory is None else os.path.join(self.directory, file_name(vassal))

    def _limits(self, vassal: str) -> tuple[int, int]:
        own = self._own.get(vassal)
        return (own[1], own[2]) if own is not None else (self.max_bytes, self.backups)

    def write(self, vassal: str, t: float, line: str) -> None:
        if self.path(vassal) is None:
            return
        data = f"{stamp(t)} {vassal}| {line}\n".encode(errors="replace")
        try:
            f, size = self._file(vassal)
            if size and size + len(data) > self._limits(vassal)[0]:
                self._rotate(vassal)
                f, size = self._file(vassal)
            f.write(data)
            self._open[vassal] = (f, size + len(data))
        except OSError as exc:
            self.close(vassal)
            if vassal not in self._failed:
                self._failed.add(vassal)
                log.error(
                    "vassal.log_file_failed name=%s path=%s error=%s",
                    vassal,
                    self.path(vassal),
                    exc.strerror or exc,
                )
            return
        self._failed.discard(vassal)

    def _file(self, vassal: str) -> tuple[IO[bytes], int]:
        found = self._open.get(vassal)
        if found is None:
            path = self.path(vassal)
            assert path is not None
            # Line-buffered in effect: each line is one write, visible to tail -f at once.
            f = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open between writes
            found = self._open[vassal] = (f, f.seek(0, os.SEEK_END))
        return found

    def _rotate(self, vassal: str) -> None:
        self.close(vassal)
        path = self.path(vassal)
        assert path is not None
        backups = self._limits(vassal)[1]
        if backups <= 0:
            os.unlink(path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{backups}")
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        os.replace(path, f"{path}.1")
        log.info("vassal.log_rotated name=%s path=%s", vassal, path)

    def close(self, vassal: str) -> None:
        found = self._open.pop(vassal, None)
        if found is not None:
            with contextlib.suppress(OSError):
                found[0].close()

    def close_all(self) -> None:
        for vassal in list(self._open):
            self.close(vassal)
