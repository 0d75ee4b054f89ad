"""A second stop signal ends the process at once (issue 22, item 5).

The first SIGTERM (or SIGUSR1) asks the loop to save at the end of the current step
(``omnitrain.train.preemption``). A step can be long: a ``data.seq_len`` far beyond what the machine can
do keeps one matmul busy for minutes, and a Python signal handler only runs when the interpreter gets
control back, after that op. So the stop signals are also watched from a thread: ``signal.set_wakeup_fd``
makes the C-level handler write every signal number to a socket the moment it arrives, and the thread
(which runs while torch computes: its ops release the GIL) counts them. A second SIGTERM or SIGINT prints
one line and ends the process with ``os._exit(128 + signum)``, as a kill would: the step in flight is lost,
the last complete checkpoint holds the run (a half-written ``.tmp`` is removed by the next save, the run
lock of a dead process is taken over by the next start). SIGUSR1 does not count: Slurm sends it ahead of
a TERM that must still save.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SecondSignalExit:
    """Watches SIGTERM / SIGINT from a thread; the second one exits the process at once. ``stop()`` undoes it."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.settimeout(None)
        self._write.setblocking(False)  # the C handler must never block
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="omnitrain-second-signal", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        seen = 0
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data:  # stop() closed the socket
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    seen += 1
                if seen >= 2:
                    name = signal.Signals(signum).name
                    print(f"second stop signal ({name}): exiting at once, without waiting for the step to end; the last "
                          "complete checkpoint holds the run (resume=auto continues from it)", file=sys.stderr, flush=True)  # fmt: skip
                    os._exit(128 + signum)

    def stop(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        self._write.close()  # the thread reads the end of the stream and returns
        self._thread.join(timeout=5)
        self._read.close()


def watch_second_signal() -> SecondSignalExit | None:
    """Start watching (main thread only: elsewhere, e.g. a training started from a worker thread, None)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return SecondSignalExit()
