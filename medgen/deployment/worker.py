"""A long-lived ClientApp process for a site's SuperNode (started with ``--isolation process``).

Flower's default runs every message in a fresh ``flwr-clientapp`` process: torch and medgen are
imported again for each query, training round and evaluation (seconds each on a small CPU). This
worker imports them once and then, in a loop, takes the SuperNode's next task from its Runtime API
(127.0.0.1 only), runs medgen's ClientApp on it in this process and hands the reply back — what
``flwr-clientapp`` does, minus the process start.

It runs medgen's own installed ClientApp only: a run whose app bundle names another ClientApp is
answered with an error (a server cannot make the site execute code it did not install).

    python -m medgen.deployment.worker --runtime-api-address 127.0.0.1:PORT [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import tomllib
import zipfile

CLIENTAPP = "medgen.client.app:app"


def fab_clientapp(fab_content: bytes) -> str:
    """The ClientApp a Flower App Bundle names in its pyproject.toml."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as z:
        config = tomllib.loads(z.read("pyproject.toml").decode())
    return str(config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp", ""))


def _runtime_client(address: str, token: str | None = None):
    from medgen._compat.flwr import (RuntimeHttpClient, RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                     make_simple_http_retry_invoker)

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client):
    """Flower's ``pull_task_input`` (flwr.supernode.runtime.run_clientapp), but retrying the
    message's objects from 0.05 s on: the SuperNode hands out the task while it is still
    downloading the weights from the SuperLink, and Flower's retries start at 1 s and double."""
    from flwr.app import Message

    from medgen._compat.flwr import (Node, PullAppMessagesRequest, PullTaskInputRequest, TaskIdentity,
                                     context_from_proto, fab_from_proto, make_confirm_message_received_fn_protobuf,
                                     make_pull_object_fn_protobuf, pull_and_inflate_object_from_tree,
                                     run_from_proto, set_message_id)
    from medgen.deployment.supernode import PULL_BACKOFF

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, **PULL_BACKOFF)
    set_message_id(message, tree.object_id)  # the deflated message lacks its own id
    return message, context, run, fab


def run_task(address: str, token: str, client_app) -> tuple[str, dict[str, float]]:
    """One task: pull the message, run the ClientApp, push the reply and the task's status.
    Returns the status and the seconds spent pulling, in the app, and pushing."""
    from flwr.app import ConfigRecord, Error, Message, MessageType

    from medgen._compat.flwr import (ErrorCode, HeartbeatSender, SubStatus, make_task_heartbeat_fn_http, push_message,
                                     push_task_output)
    from medgen.deployment.packing import TRANSPORT, pack, unpack

    client = _runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed"
    times, t0 = {}, time.perf_counter()
    try:
        message, context, run, fab = pull_task_input(client)
        times["pull"] = time.perf_counter() - t0
        named = fab_clientapp(fab.content)
        if named != CLIENTAPP:
            raise RuntimeError(f"this site runs only medgen's ClientApp ({CLIENTAPP}); run {run.run_id} asks for "
                               f"{named!r}")
        packed = unpack(message.content)  # the server packed the weights (medgen/deployment/packing.py)
        t1 = time.perf_counter()
        reply = client_app(message=message, context=context)
        times["app"] = time.perf_counter() - t1
        if reply.has_content():
            if message.metadata.message_type == MessageType.QUERY:
                reply.content[TRANSPORT] = ConfigRecord({"packing": 1})  # tell the server we unpack
            if packed:
                pack(reply.content)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # what flwr-clientapp does: the reply carries the error
        print(f"ClientApp raised: {type(ex).__name__}: {ex}", file=sys.stderr, flush=True)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        t2 = time.perf_counter()
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        finally:
            heartbeat.stop()
            client.close()
        times["push"] = time.perf_counter() - t2
    return sub_status, times


def serve(address: str, poll_s: float = 0.1, parent_pid: int | None = None) -> None:
    from medgen._compat.flwr import AcquireTaskRequest
    from medgen.client.app import app as client_app  # the expensive imports, once
    from medgen.deployment.polling import Poll

    client = _runtime_client(address)
    poll = Poll(first=min(0.01, poll_s), cap=poll_s, idle_reset_s=0.5)  # the next task comes soon after one ends
    print(f"medgen worker ready (pid {os.getpid()}), serving tasks of {address}", flush=True)
    while parent_pid is None or _alive(parent_pid):
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        if res.HasField("task") and res.token:
            t0 = time.perf_counter()
            status, times = run_task(address, res.token, client_app)
            split = ", ".join(f"{k} {v:.2f}" for k, v in times.items())
            print(f"task {res.task.task_id}: {status} in {time.perf_counter() - t0:.2f} s ({split})", flush=True)
            poll.reset()
            continue
        poll.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--poll", type=float, default=0.1, help="most seconds between task polls")
    args = parser.parse_args(argv)
    from medgen._compat.flwr import use_heartbeat
    from medgen.deployment.supernode import heartbeat_s

    use_heartbeat(heartbeat_s())  # the same task heartbeats as the SuperNode expects (MEDGEN_HEARTBEAT_S)
    try:
        serve(args.runtime_api_address, args.poll, args.parent_pid)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
