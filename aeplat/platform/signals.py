"""Signal handling of the driver process."""

from __future__ import annotations

import signal
import threading
from types import FrameType


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
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handle)
