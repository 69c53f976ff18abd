"""How a command stops: Ctrl-C and a scheduler's SIGTERM, while `clinfuse.cli.main` runs it.

Inside `with StopSignals():` Ctrl-C raises `Interrupted` (a KeyboardInterrupt) and SIGTERM
`Terminated` in the main thread, so the same clean-up runs for both: DataLoader workers and Ray
are shut down, nothing is left orphaned, and `main` prints one line. Three things Python's own
handling gets wrong for a long batch command are handled here:

- a stop that something swallows on its way up is given again: numpy was seen to discard a
  KeyboardInterrupt raised inside `Generator.choice`, and the command went on as if the key had
  not been pressed. Each stop is watched by a thread; freed before `main` caught it, it was
  swallowed, and the signal is sent to the main thread again (which also wakes a blocking call);
- a DataLoader worker that the same signal ended (a scheduler's kill reaches every process of
  the job) is no error: torch's SIGCHLD handler made it a traceback while the command stopped;
- a signal the command was started with ignored (`nohup`, a background job of a script) stays
  ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a command runs (a KeyboardInterrupt that `StopSignals` can watch)."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's `kill`), raised like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def not_a_stop(record: logging.LogRecord) -> bool:
    """A logging filter: False for a record that logs a stop as an error. SQLAlchemy logs one
    with its traceback when a stop lands while it returns a connection to its pool, then lets
    the stop go on; the command's one line says all there is."""
    return not (record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, Terminated)))


class StopSignals:
    """The stop handlers of one command (see the module docstring); outside the main thread,
    where no handler can be set, it does nothing."""

    def __init__(self, patience: float = 30.0) -> None:
        self.patience = patience  # how long a raised stop is watched
        self.lock = threading.Lock()  # the watchers' check and `__exit__` take turns
        self.over = False  # the command ended, or its stop reached `__exit__`
        self.replaced: dict[int, Any] = {}  # the stop signals' handlers, put back at the end
        self.owner = os.getpid()
        self.main_thread = threading.main_thread().ident

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.replaced[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.lock:  # a stop still travelling here is alive: no watcher sends it again
            self.over = True
        # a stop arriving meanwhile still ends the command: `main` catches either kind
        for signum, handler in self.replaced.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)

    def _stop(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner:  # a forked worker (DataLoader, validate's pool)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # as Python's own handler: torch's worker loop ends
            signal.signal(signum, signal.SIG_DFL)  # SIGTERM: die quietly
            os.kill(os.getpid(), signum)
        # not put back: the loader's workers are shut down while the stop travels on, after
        # `__exit__` (its traceback holds their frames); so in this process a later loader
        # finds a dead worker by its timeout instead
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise self._watched(signum)  # no local names it: swallowed, it is freed at once

    def _watched(self, signum: int) -> BaseException:
        """A new stop for `signum`, and the thread that gives the signal again if the stop is
        freed before it reaches `__exit__` (one kept alive by a reference is not seen)."""
        stop = Interrupted() if signum == signal.SIGINT else Terminated(signum)
        alive = weakref.ref(stop)

        def watch() -> None:
            deadline = time.monotonic() + self.patience
            while time.monotonic() < deadline:
                time.sleep(0.2)
                with self.lock:
                    if self.over:
                        return
                    if alive() is None:
                        signal.pthread_kill(self.main_thread, signum)
                        return

        threading.Thread(target=watch, daemon=True).start()
        return stop
