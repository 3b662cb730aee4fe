"""Polls that are quick when an answer is due and sparse when the line is idle.

A deployed exchange is a chain of polls (the server for replies, each SuperNode for messages and
for its worker's reply, each worker for tasks). A fixed interval costs half of it on average at
every hop; a short fixed interval costs a request every few milliseconds per site while idle.
:class:`Poll` starts short after activity and grows geometrically to ``cap``: the wait added to
an answer that takes ``t`` seconds is at most ``(factor - 1) · t`` (and at most ``cap``), and an idle
line settles at one request per ``cap`` seconds.
"""

from __future__ import annotations

import time


class Poll:
    """``wait()`` sleeps ``first``, then ``factor`` times longer each call, up to ``cap`` seconds.
    A call that comes more than ``idle_reset_s`` after the previous wait ended (work was done in
    between: a message arrived) starts again from ``first``; so does :meth:`reset`."""

    def __init__(self, first: float = 0.01, cap: float = 0.25, factor: float = 1.5, idle_reset_s: float = 0.1):
        if not 0 < first <= cap or factor < 1:
            raise ValueError(f"Poll(first={first}, cap={cap}, factor={factor}): need 0 < first <= cap, factor >= 1")
        self.first, self.cap, self.factor, self.idle_reset_s = first, cap, factor, idle_reset_s
        self.interval, self._ended = first, float("-inf")

    def reset(self) -> None:
        self.interval = self.first

    def wait(self) -> float:
        """Sleep the current interval; returns it."""
        if time.monotonic() - self._ended > self.idle_reset_s:
            self.reset()
        slept = self.interval
        time.sleep(slept)
        self.interval = min(self.cap, self.interval * self.factor)
        self._ended = time.monotonic()
        return slept
