"""Stop requests (SIGTERM from a scheduler, SIGINT from Ctrl-C) turned into "save at this step, then exit".

With several processes every one must save the *same* step, so the decision goes through JAX's
preemption sync service (via orbax's ``reached_preemption``): it hears SIGTERM in any process and agrees
on a step all processes reach. A single process just sets a flag from a Python signal handler."""
from __future__ import annotations

import os
import signal
from typing import Callable

import jax


class StopRequests:
    """``requested(step)`` must be called by every process at every step (the sync point needs it)."""

    def __init__(self, reached_preemption: Callable[[int], bool]):
        self.multi = jax.process_count() > 1
        self.reached_preemption = reached_preemption
        self.signal: str | None = None
        self._old = {}
        # JAX's C++ preemption notifier owns SIGTERM in multi-process runs; SIGINT is forwarded to it.
        for sig in ((signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # a second Ctrl-C really interrupts
            self.close()
            raise KeyboardInterrupt
        self.signal = name
        if jax.process_index() == 0 or not self.multi:
            print(f"\n{name} received: finishing this step, saving a checkpoint, then exiting", flush=True)
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self.multi:
            return self.reached_preemption(step)
        return self.signal is not None

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
