"""`python -m medgen.deployment.supernode [flower-supernode flags]`: Flower's own SuperNode with a
shorter idle poll, and an answer for a message whose ClientApp worker died before reading it.

Flower 1.41's SuperNode asks the SuperLink for a new message every 3 s when it has none, and
checks every 0.5 s whether the ClientApp's reply is ready (``time.sleep(3)`` / ``time.sleep(0.5)``
in ``flwr.supernode.start_client_internal``): each exchange between the server and a site waits
on average 1.5 s for nothing, a training round (train + evaluate) about 3 s. This entry point runs
the unchanged SuperNode with each of those waits a :class:`~medgen.deployment.polling.Poll`: from
10-20 ms after the SuperNode switches between waiting for a message and waiting for its worker's
reply, growing to ``MEDGEN_SUPERNODE_POLL_S`` seconds (default 0.25) — an idle site sends one small
HTTPS request every 0.25 s, a busy one notices the next message or reply within milliseconds. Its
retries for a message's objects that are not at the SuperLink yet start at 0.05 s instead of 1 s
(then double, up to 0.5 s instead of 10 s). When it cannot reach the SuperLink (started before
the server, or the server restarting) it tries again after 0.25 s, growing ×1.5 to at most
``RECONNECT_MAX_S`` (2 s) instead of Flower's doubling to 20 s: a site joins within about 2 s of
the server coming up.

``MEDGEN_HEARTBEAT_S`` (default: Flower's 30 s; at least 10, the SuperLink's minimum) sets how
often this SuperNode tells the SuperLink it is alive and how often its ClientApp worker tells the
SuperNode that a task is still running (``use_heartbeat``, also called by the worker). Both sides
give up after 2 missed heartbeats: the SuperLink keeps counting a SIGKILLed SuperNode as online
(and turns its restarted successor away) for up to 2 × that, and a task whose worker died is
answered with an error after up to 2 × that — also when it died before reading its message
(``answer_orphaned_messages``; Flower leaves that one unanswered and the SuperNode stuck). The tests
set 10 s to wait those out sooner.
"""

from __future__ import annotations

import os
import sys
import time
import types


PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5}
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.25, 2.0
HEARTBEAT_ENV = "MEDGEN_HEARTBEAT_S"


def heartbeat_s() -> float:
    """``$MEDGEN_HEARTBEAT_S``, or Flower's default heartbeat interval when it is unset; ValueError
    naming the variable when it is not a number the SuperLink accepts."""
    from medgen._compat.flwr import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return float(HEARTBEAT_DEFAULT_INTERVAL)
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{HEARTBEAT_ENV}={text!r}: not a number of seconds") from None
    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"{HEARTBEAT_ENV}={text}: must be between {HEARTBEAT_MIN_INTERVAL} and "
                         f"{HEARTBEAT_MAX_INTERVAL} s (the SuperLink refuses other heartbeat intervals)")
    return seconds


IDLE_FIRST_S, REPLY_FIRST_S = 0.02, 0.01  # a poll for a message is an HTTPS request; for a reply, a local look


def polling_time(poll_s: float) -> types.SimpleNamespace:
    """The ``time`` module, with ``sleep(s)`` a :class:`Poll` per requested ``s`` (Flower's idle
    3 s, its reply and object 0.5 s) capped at ``poll_s`` seconds, that starts again from its
    first interval whenever the previous sleep asked for another duration (a message came, or
    its reply went)."""
    from medgen.deployment.polling import Poll

    polls: dict[float, Poll] = {}
    last: list[float | None] = [None]

    def sleep(seconds: float) -> None:
        if seconds not in polls:
            cap = min(seconds, poll_s)
            polls[seconds] = Poll(first=min(IDLE_FIRST_S if seconds >= 1 else REPLY_FIRST_S, cap), cap=cap,
                                  idle_reset_s=0.5)
        if last[0] != seconds:
            polls[seconds].reset()
        last[0] = seconds
        polls[seconds].wait()

    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fast.sleep = sleep
    return fast


def main() -> None:
    from medgen._compat.flwr import (answer_orphaned_messages, flower_supernode, quick_reconnect, speed_up_supernode,
                                     use_heartbeat)

    answer_orphaned_messages()
    quick_reconnect(RECONNECT_FIRST_S, RECONNECT_MAX_S)
    speed_up_supernode(polling_time(float(os.environ.get("MEDGEN_SUPERNODE_POLL_S", "0.25"))), PULL_BACKOFF)
    use_heartbeat(heartbeat_s())
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
