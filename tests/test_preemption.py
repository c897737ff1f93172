"""Stop requests: the first signal asks for a save, a second Ctrl-C interrupts, handlers are restored."""
import os
import signal

import pytest

from stem_jax.preemption import StopRequests


def test_sigterm_requests_a_stop_and_a_second_ctrl_c_interrupts(capsys):
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequests(reached_preemption=lambda step: pytest.fail("single process needs no sync"))
    assert not stop.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested(2) and stop.signal == "SIGTERM"
    assert "SIGTERM received: finishing this step, saving a checkpoint" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # the second signal already restored the handlers
    stop.close()
