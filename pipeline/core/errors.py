"""The project's errors and the one boundary where they become a message: no traceback reaches a user.

Every error buildseg raises on purpose (a bad config value, a damaged tile, a run folder in use, ...)
derives from :class:`BuildsegError` and carries a message that names the file or setting and the fix.
Every command-line entry point is wrapped in :func:`cli`, which prints such an error, or an operating
system error (a read-only folder, a full disk, a missing file), as one line ``error: <message>`` on
stderr and exits 2; Ctrl-C outside training exits 130 with one line. Anything else is a bug in
buildseg and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Sequence

EXIT_ERROR = 2  # what every entry point returns for a bad input (argparse uses 2 for bad arguments too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

_OS_FIXES = {
    errno.ENOSPC: "free space on that disk, or write somewhere else",
    errno.EDQUOT: "free space within your disk quota, or write somewhere else",
    errno.EACCES: "make the folder writable (chmod / chown) or choose another one",
    errno.EPERM: "make the folder writable (chmod / chown) or choose another one",
    errno.EROFS: "the disk is mounted read-only: choose a folder on a writable disk",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder: give a file",
    errno.EEXIST: "a file is in the way of a folder to be made: move it, or choose another path",
}


class BuildsegError(Exception):
    """Base of the errors buildseg raises on purpose; the message names the file or setting and the fix.

    Each module's error (``ConfigError``, ``DataError``, ``CheckpointError``, ...) also derives from the
    builtin it has always been (``ValueError`` or ``RuntimeError``), so existing ``except`` clauses hold.
    """


def os_error_message(e: OSError) -> str:
    """``<file>: <reason>; <fix>`` for an operating-system error (errno-specific fix when known)."""
    where = f"{e.filename}: " if e.filename else ""
    reason = e.strerror or str(e)
    fix = _OS_FIXES.get(e.errno or -1)
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


def cli(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap an entry point ``main(argv) -> exit code``: project errors and OS errors become one line
    ``error: <message>`` on stderr and exit code 2; Ctrl-C becomes exit code 130."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except BuildsegError as e:
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:
            print(f"error: {os_error_message(e)}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return EXIT_ERROR

    return wrapped
