"""Starting a child process that a Ctrl-C (SIGINT) reaches, whatever this test process inherited."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_default() -> Iterator[None]:
    """Processes started inside the block begin with SIGINT at its default, as a terminal's foreground job.

    A background job of a non-interactive shell (`bash -c 'pytest ... &'`, as CI scripts and nohup runs
    start test suites) ignores SIGINT, and an ignored signal stays ignored across fork and exec: a Python
    child then installs no KeyboardInterrupt handler and a Ctrl-C test waits for nothing. A handler (not
    SIG_IGN) in this process is reset to the default by exec, so the child starts as from a terminal.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
