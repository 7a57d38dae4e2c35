"""Signal handling of the driver process."""

from __future__ import annotations

import signal
import threading
from types import FrameType


# Number of the last signal the handler turned into an exception. Libraries may replace the
# exception on its way up (Ray Tune does), so the exit status is taken from here.
received_signal: int | None = None


class Terminated(KeyboardInterrupt):
    """KeyboardInterrupt raised for SIGTERM, with the signal number for the exit status 128 + N."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def raise_keyboard_interrupt_on_sigterm() -> None:
    """Turn SIGTERM (kill, timeout, a Kubernetes pod eviction) into KeyboardInterrupt.

    The search then ends its MLflow runs as KILLED instead of leaving them RUNNING. `ray.init`
    installs a native handler that aborts the process on SIGTERM, so the search calls this
    again after Ray has started. Only the main thread may install handlers; elsewhere this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        global received_signal
        received_signal = signum
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handle)
