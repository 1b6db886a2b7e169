"""The hostile sweep's judge: each probe ends in one line of the error class it names (a `PolymodalError`), or in
a result the probe itself checks, within a time limit (a hang fails the probe). Each probe's test id starts with
its expected outcome (an error class, or `result`); tests/conftest.py's terminal summary counts the probes that
passed per outcome. A module, not a conftest.py: tests/serve imports its own conftest by that name."""

import signal

import pytest

from polymodal.errors import PolymodalError

LIMIT_S = 60  # a probe that takes longer hangs: every one of them runs in well under a second


def judge(fn, expected: type | None, match: str | None = None):
    """fn's result when `expected` is None; else the one-line message of the `expected` error fn raises, which
    must be a PolymodalError and contain `match`. Any other exception fails the probe with its traceback."""
    def hang(*_):
        raise TimeoutError(f"the probe ran past {LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(LIMIT_S)
    try:
        if expected is None:
            return fn()
        with pytest.raises(expected) as info:
            fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = str(info.value)
    assert isinstance(info.value, PolymodalError), f"{type(info.value).__name__} is no PolymodalError: {message}"
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert match is None or match in message, f"{match!r} not in {message!r}"
    return message
