"""A SIGINT whose KeyboardInterrupt is swallowed (as in a destructor) is raised again at the next check."""

import os
import signal
import time

import pytest

from experiments.train.interrupts import interrupts_recorded, raise_if_interrupted


def _sigint_swallowed():
    """Deliver SIGINT to this process and drop the KeyboardInterrupt, as Python does inside a weakref
    callback."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    except KeyboardInterrupt:
        pass


def test_swallowed_interrupt_is_raised_again_and_the_handler_restored():
    before = signal.getsignal(signal.SIGINT)
    with interrupts_recorded():
        raise_if_interrupted()  # nothing pending: no exception
        _sigint_swallowed()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is before
    raise_if_interrupted()  # cleared when the block ends
