"""Every Flower internal medgen uses: names beyond Flower's documented API (``flwr.app``,
``flwr.clientapp``, ``flwr.serverapp``, ``flwr.serverapp.strategy``, ``flwr.simulation``), and
the private attributes and module globals medgen changes. Written against flwr 1.41; importing this
module with another flwr installed raises :class:`medgen._compat.IncompatibleVersion` naming both
versions (``pyproject.toml`` bounds flwr the same way; ``constraints.txt`` pins the tested one).

Names are imported from Flower when first asked for (``from medgen._compat.flwr import X``), so
that importing this module costs no more than ``import flwr``: the site's worker and the deployed
SuperNode keep their start-up time. What they are for:

- robust aggregation (``medgen/server/strategy.py``): the rules of ``FedTrimmedAvg``,
  ``MultiKrum`` / ``Krum`` and ``Bulyan``, which live in those strategies' modules;
- central DP (``medgen/privacy/central.py``): Flower's DP primitives
  (``flwr.supercore.differential_privacy``) and the adaptive-clipping update of
  ``DifferentialPrivacyServerSideAdaptiveClipping`` (:func:`adaptive_clipping_update`);
- secure aggregation (``medgen/privacy/secagg.py``): Shamir's secret sharing
  (``flwr.common.secure_aggregation.crypto.shamir``: pycryptodome's Shamir over 16-byte chunks);
- the site's long-lived ClientApp worker (``medgen/deployment/worker.py``): what ``flwr-clientapp``
  does with the SuperNode's Runtime API (runtime client, protobuf messages, serde, object pulls,
  heartbeat, task identity), and :func:`set_message_id`;
- the SuperLink's Control API client (``medgen/deployment/link.py``) and the simulation config of
  a run (``medgen/simulation.py``), the app bundle builder (``medgen/deployment/fab.py``);
- the SuperNode's task state: :func:`answer_orphaned_messages` wraps ``InMemoryNodeState``'s
  handling of expired tasks;
- shorter polls: :func:`speed_up_supernode` and :func:`quick_reconnect` (``medgen/deployment/supernode.py``) and
  :func:`quick_object_pulls` (``medgen/deployment/grid.py``) replace module globals of Flower's;
  :func:`quick_simulation_pulls` (``medgen/server/app.py``) sets the simulation Grid's pull interval.
"""

from __future__ import annotations

import functools
import importlib
import sys

import flwr

from medgen._compat import check_version

MINIMUM, BELOW = "1.41", "1.42"
check_version("flwr", flwr.__version__, MINIMUM, BELOW, "medgen uses Flower internals: medgen/_compat/flwr.py")

# name -> the Flower module it comes from (imported on first use)
_FROM = {
    # robust aggregation
    "aggregate_n_closest_weights": "flwr.serverapp.strategy.bulyan",
    "trim_mean": "flwr.serverapp.strategy.fedtrimmedavg",
    "select_multikrum": "flwr.serverapp.strategy.multikrum",
    # central DP
    "adaptive_clip_inputs_inplace": "flwr.supercore.differential_privacy",
    "add_gaussian_noise_inplace": "flwr.supercore.differential_privacy",
    "compute_adaptive_noise_params": "flwr.supercore.differential_privacy",
    "compute_stdv": "flwr.supercore.differential_privacy",
    "get_norm": "flwr.supercore.differential_privacy",
    # secure aggregation (medgen/privacy/secagg.py): Shamir's secret sharing
    "create_shares": "flwr.common.secure_aggregation.crypto.shamir",
    "combine_shares": "flwr.common.secure_aggregation.crypto.shamir",
    # Runtime API (the site's worker) and Control API (the server)
    "RuntimeHttpClient": "flwr.supercore.runtime",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors",
    "make_simple_http_retry_invoker": "flwr.supercore.retry",
    "ControlHttpClient": "flwr.supercore.control",
    "CliClientHttpInterceptor": "flwr.cli.cli_client_interceptor",
    "context_from_proto": "flwr.common.serde",
    "fab_from_proto": "flwr.common.serde",
    "run_from_proto": "flwr.common.serde",
    "fab_to_proto": "flwr.common.serde",
    "user_config_to_proto": "flwr.common.serde",
    "ErrorCode": "flwr.common.constant",
    "SubStatus": "flwr.common.constant",
    "HEARTBEAT_DEFAULT_INTERVAL": "flwr.common.constant",
    "HEARTBEAT_MAX_INTERVAL": "flwr.common.constant",
    "HEARTBEAT_MIN_INTERVAL": "flwr.common.constant",
    "Node": "flwr.proto.node_pb2",
    "AcquireTaskRequest": "flwr.proto.runtime_pb2",
    "PullAppMessagesRequest": "flwr.proto.runtime_pb2",
    "PullTaskInputRequest": "flwr.proto.runtime_pb2",
    "ListNodesRequest": "flwr.proto.control_pb2",
    "ListRunsRequest": "flwr.proto.control_pb2",
    "RegisterNodeRequest": "flwr.proto.control_pb2",
    "StartRunRequest": "flwr.proto.control_pb2",
    "StopRunRequest": "flwr.proto.control_pb2",
    "SimulationConfig": "flwr.proto.federation_config_pb2",
    "make_confirm_message_received_fn_protobuf": "flwr.supercore.inflatable.inflatable_protobuf_utils",
    "make_pull_object_fn_protobuf": "flwr.supercore.inflatable.inflatable_protobuf_utils",
    "pull_and_inflate_object_from_tree": "flwr.supercore.inflatable.inflatable_utils",
    "TaskIdentity": "flwr.supercore.task_identity",
    "HeartbeatSender": "flwr.supercore.heartbeat",
    "make_task_heartbeat_fn_http": "flwr.supercore.heartbeat",
    "push_message": "flwr.supernode.runtime.run_clientapp",
    "push_task_output": "flwr.supernode.runtime.run_clientapp",
    "public_key_to_bytes": "flwr.supercore.primitives.asymmetric",
    "Fab": "flwr.supercore.fab",
    # app bundle, SuperNode entry point
    "build_fab_from_files": "flwr.cli.build",
    "flower_supernode": "flwr.supernode.cli.flower_supernode",
}

__all__ = sorted([*_FROM, "MINIMUM", "BELOW", "adaptive_clipping_update", "quick_object_pulls",
                  "quick_simulation_pulls", "set_message_id",
                  "speed_up_supernode", "use_heartbeat", "heartbeat_intervals", "answer_orphaned_messages"])


def __getattr__(name: str):
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# ---------------------------------------------------------------------- private attributes and globals
def adaptive_clipping_update(strategy, unclipped: int, total: int) -> None:
    """One step of the clipping-norm rule of a ``DifferentialPrivacyServerSideAdaptiveClipping``
    (its private ``_noisy_fraction`` / ``_geometric_update``): ``strategy.clipping_norm`` becomes
    C exp(-lr (b~ - target)), with b~ = (``unclipped`` + N(0, clipped_count_stddev)) / ``total``."""
    strategy._geometric_update(strategy._noisy_fraction(unclipped, total))


def set_message_id(message, object_id: str) -> None:
    """Give an inflated message its id (Flower's ``Metadata.message_id`` has no setter; a message
    inflated from its object tree lacks it)."""
    message.metadata.__dict__["_message_id"] = object_id


def speed_up_supernode(time_module, pull_backoff: dict) -> None:
    """Before ``flower_supernode()`` runs: its idle and reply polls sleep through ``time_module``
    (``time.sleep(3)`` / ``time.sleep(0.5)`` in ``flwr.supernode.start_client_internal``), and its
    pulls of a message's objects retry with ``pull_backoff`` (``initial_backoff``, ``backoff_cap``)."""
    import flwr.supernode.start_client_internal as internal

    internal.time = time_module
    internal.pull_objects = functools.partial(internal.pull_objects, **pull_backoff)
    _trace_exchanges(internal)


def quick_reconnect(first_s: float, max_s: float) -> None:
    """Before ``flower_supernode()`` runs: its HTTP requests to the SuperLink (connecting, and any
    request that fails to connect) retry after ``first_s`` seconds, then 1.5 times longer each time
    up to ``max_s`` (with Flower's full jitter), instead of Flower's 1 s doubling up to 20 s."""
    import flwr.supercore.retry.http_retry as http_retry
    from flwr.supercore.retry.retry_invoker import exponential

    http_retry.exponential = lambda **_: exponential(base_delay=first_s, multiplier=1.5, max_delay=max_s)


def _trace_exchanges(internal) -> None:
    """Each message the SuperNode pulls and each reply it pushes get one line on stderr (the
    site's ``supernode.log``): seconds in the SuperLink requests (the message and its objects),
    and before a push the wait for the ClientApp's reply — the per-hop split of a deployed
    exchange (``benchmarks/deployment.py`` sums them)."""
    import time

    pull, push = internal._pull_and_store_message, internal._push_messages

    def timed(fn, spent: list):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)
        return call

    def traced_pull(**kwargs):
        t0, objects = time.perf_counter(), []
        kwargs["pull_object"] = timed(kwargs["pull_object"], objects)
        run_id = pull(**kwargs)
        if run_id is not None:
            print(f"medgen-trace pull {time.perf_counter() - t0:.4f} s ({len(objects)} objects "
                  f"{sum(objects):.4f} s)", file=sys.stderr, flush=True)
        return run_id

    def traced_push(**kwargs):
        t0, sent, objects = time.perf_counter(), [], []
        kwargs["send"] = timed(kwargs["send"], sent)
        kwargs["push_object"] = timed(kwargs["push_object"], objects)
        push(**kwargs)
        total = time.perf_counter() - t0
        print(f"medgen-trace push {sum(sent) + sum(objects):.4f} s ({len(objects)} objects {sum(objects):.4f} s) "
              f"after waiting {total - sum(sent) - sum(objects):.4f} s for the reply", file=sys.stderr, flush=True)

    internal._pull_and_store_message, internal._push_messages = traced_pull, traced_push


def answer_orphaned_messages() -> None:
    """Before ``flower_supernode()`` runs: a message whose ClientApp task died after the task started
    but before it read the message gets the same "ClientApp crashed" reply as a message the task
    had read. Flower 1.41 answers only read messages when a running task stops sending heartbeats;
    an unread one then has no task and no reply, and the SuperNode, which waits for a reply before
    it pulls the next message, never serves the study again (a site's worker killed at that moment).
    Only a run with no other unfinished task has such an orphan: a pending task will read it."""
    from flwr.common.constant import Status
    from flwr.supercore.constant import TaskType
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    flowers = InMemoryNodeState._on_task_tokens_expired
    if getattr(flowers, "answers_orphans", False):
        return

    def on_task_tokens_expired(self, tasks) -> None:
        # called by Flower with lock_task_store held, so task_store is read as it stands
        runs = {task.run_id for task in tasks if task.type == TaskType.CLIENT_APP}
        runs -= {task.run_id for task in self.task_store.values() if task.status.status != Status.FINISHED}
        with self.lock_msg_store:
            for entry in self.msg_store.values():
                meta = entry.message.metadata
                if meta.run_id in runs and not meta.reply_to_message_id and not entry.is_retrieved:
                    entry.is_retrieved = True
                    self.record_message_processing_start(meta.message_id)
        flowers(self, tasks)

    on_task_tokens_expired.answers_orphans = True
    InMemoryNodeState._on_task_tokens_expired = on_task_tokens_expired


def use_heartbeat(seconds: float) -> None:
    """Make ``seconds`` Flower's heartbeat interval in this process: what the SuperNode announces
    to the SuperLink, the cadence of every HeartbeatSender (the SuperNode's, a worker's task
    heartbeats), and how long the SuperNode keeps a task whose worker stopped sending them."""
    for module in _heartbeat_modules():
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def _heartbeat_modules() -> list:
    import flwr.supercore.corestate.in_memory_corestate as task_state
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet

    sql = sys.modules.get("flwr.supercore.corestate.sql_corestate")
    return [m for m in (heartbeat, fleet, task_state, sql) if m is not None]


def heartbeat_intervals() -> dict[str, float]:
    """The heartbeat interval each Flower module that keeps one uses now (what :func:`use_heartbeat` sets)."""
    return {m.__name__: m.HEARTBEAT_DEFAULT_INTERVAL for m in _heartbeat_modules()}


def quick_object_pulls(grid, pull_backoff: dict, deadline=None) -> None:
    """The deployed Grid pulls a reply's objects (the weights) with retries from 1 s on, doubling;
    a reply can be listed a moment before all its objects have arrived. Retry with ``pull_backoff``
    instead (the ``pull_objects`` global of the grid's module; a Grid without one is left as it is).
    ``deadline()`` (a ``time.monotonic()`` value, or None) bounds the retries: Flower retries an
    object for up to 2 hours, so one site that died while uploading its reply held up the replies
    of every other site pulled with it."""
    import time

    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if pull is None:
        return
    if getattr(pull, "medgen_quick", False):  # patched for an earlier Grid of this process
        pull.deadline = deadline
        return

    def quick_pull(*args, **kwargs):
        end = quick_pull.deadline() if quick_pull.deadline is not None else None
        if end is not None:
            kwargs["max_time"] = max(0.5, end - time.monotonic())
        return pull(*args, **{**pull_backoff, **kwargs})

    quick_pull.medgen_quick, quick_pull.deadline = True, deadline
    module.pull_objects = quick_pull


def quick_simulation_pulls(grid, seconds: float) -> bool:
    """Flower's simulation Grid (``InMemoryGrid``, in the ``flwr-simulation`` process) sleeps its
    ``pull_interval`` (0.1 s) between looks for the replies to a ``send_and_receive``; make it
    ``seconds``. A look reads the in-memory LinkState (microseconds). Another Grid is left as it is;
    returns whether the interval was set."""
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return False
    grid.pull_interval = seconds
    return True
