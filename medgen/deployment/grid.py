"""Replies from the sites, sooner. Flower's deployed Grid waits 3 s between polls for replies
(``send_and_receive``), which adds up to 3 s to every exchange, and it waits for a site whose
SuperNode has gone away until the round timeout (and the SuperLink's own "node unavailable"
error comes from the SuperLink's node id, not the site's). This version polls from 20 ms on, up to
every ``poll_s`` seconds, and answers for a site that went offline at once, with an error under the site's node;
to sites whose worker unpacks, the weights travel packed in one array (``packing.py``)."""

from __future__ import annotations

import time

from flwr.app import Error, Message
from flwr.serverapp import Grid

from medgen.deployment.packing import TRANSPORT, pack, unpack

OFFLINE = "its SuperNode went offline (disconnected or stopped) before it answered"


def quick_replies(grid: Grid, poll_s: float = 0.2, online_every_s: float = 2.0) -> Grid:
    """Give ``grid`` a ``send_and_receive`` with the same contract (the replies that arrived within
    ``timeout``) that polls from 20 ms on, growing to every ``poll_s`` s (``polling.Poll``), and
    checks every ``online_every_s`` s which destination nodes are still online."""
    from medgen.deployment.polling import Poll

    packing_nodes: set[int] = set()  # sites whose worker unpacks (medgen/deployment/packing.py)
    exchange_end: list[float | None] = [None]  # the current exchange's deadline bounds its object pulls

    def send_and_receive(messages, *, timeout: float | None = None):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.dst_node_id in packing_nodes and msg.has_content():
                pack(msg.content)
        ids = list(grid.push_messages(messages))
        pending = {i: m for i, m in zip(ids, messages) if i}
        end = time.monotonic() + (timeout or 0.0)
        exchange_end[0] = end if timeout is not None else None
        checked = time.monotonic()
        poll = Poll(first=min(0.02, poll_s), cap=poll_s)
        replies = []
        while pending:
            for reply in grid.pull_messages(list(pending)):
                msg = pending.pop(reply.metadata.reply_to_message_id, None)
                if msg is not None and reply.metadata.src_node_id != msg.metadata.dst_node_id:
                    # the SuperLink answers for an unavailable node in its own name: re-address the
                    # error to the site it concerns, so that the server logs it under the site's name
                    reason = reply.error.reason if reply.has_error() else "a reply from another node"
                    reply = Message(Error(code=0, reason=f"{OFFLINE} ({reason})"), reply_to=msg)
                if reply.has_content():
                    unpack(reply.content)
                    if TRANSPORT in reply.content:
                        packing_nodes.add(reply.metadata.src_node_id)
                replies.append(reply)
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            if time.monotonic() - checked > online_every_s:
                checked = time.monotonic()
                online = set(grid.get_node_ids())
                for i, msg in list(pending.items()):
                    if msg.metadata.dst_node_id not in online:
                        replies.append(Message(Error(code=0, reason=OFFLINE), reply_to=msg))
                        del pending[i]
            poll.wait()
        return replies

    grid.send_and_receive = send_and_receive
    _quick_object_pulls(grid, lambda: exchange_end[0])
    return grid


def _quick_object_pulls(grid: Grid, deadline) -> None:
    """The deployed Grid pulls a reply's objects (the weights) with retries from 1 s on, doubling;
    a reply can be listed a moment before all its objects have arrived. Retry from 0.05 s, and
    only until the exchange's deadline: a site that died mid-upload is then answered for, and the
    other sites' replies pulled with it still count."""
    from medgen._compat.flwr import quick_object_pulls
    from medgen.deployment.supernode import PULL_BACKOFF

    quick_object_pulls(grid, PULL_BACKOFF, deadline)
