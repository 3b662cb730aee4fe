"""`python -m medgen.deployment.supernode [flower-supernode flags]`: Flower's own SuperNode with a
shorter idle poll.

Flower 1.41's SuperNode asks the SuperLink for a new message every 3 s when it has none, and
checks every 0.5 s whether the ClientApp's reply is ready (``time.sleep(3)`` / ``time.sleep(0.5)``
in ``flwr.supernode.start_client_internal``): each exchange between the server and a site waits
on average 1.5 s for nothing, a training round (train + evaluate) about 3 s. This entry point runs
the unchanged SuperNode with those sleeps capped at ``MEDGEN_SUPERNODE_POLL_S`` seconds (default
0.25): one small HTTPS request per poll per site, instead of one every 3 s. Its retries for a
message's objects that are not at the SuperLink yet start at 0.05 s instead of 1 s (then double,
up to 0.5 s instead of 10 s).
"""

from __future__ import annotations

import os
import sys
import time
import types


PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5}


def capped_time(poll_s: float) -> types.SimpleNamespace:
    """The ``time`` module, with ``sleep`` capped at ``poll_s`` seconds."""
    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fast.sleep = lambda seconds: time.sleep(min(seconds, poll_s))
    return fast


def main() -> None:
    from medgen._compat.flwr import flower_supernode, speed_up_supernode

    speed_up_supernode(capped_time(float(os.environ.get("MEDGEN_SUPERNODE_POLL_S", "0.25"))), PULL_BACKOFF)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
