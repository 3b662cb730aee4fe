"""One boundary around Flower's and Opacus' internals (#19 req 2): only ``medgen/_compat/`` imports
them, and its modules refuse a version outside the range they were written against."""

from __future__ import annotations

import ast
import sys
import time
import tomllib
from pathlib import Path

import flwr
import opacus
import pytest

from medgen._compat import IncompatibleVersion, check_version

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "medgen" / "_compat"

# Documented public API. Flower: the Message API (https://flower.ai/docs/framework/ref-api/flwr.html);
# its legacy flwr.client / flwr.server / flwr.common are documented too, but medgen does not build on
# them (design.md), so they are not listed. Opacus: its API reference (opacus.ai/api).
PUBLIC = {
    "flwr": {"flwr", "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation"},
    "opacus": {"opacus", "opacus.privacy_engine", "opacus.accountants", "opacus.accountants.utils",
               "opacus.optimizers", "opacus.validators", "opacus.data_loader", "opacus.layers",
               "opacus.grad_sample", "opacus.grad_sample.conv"},
}
# Private attributes and module globals of Flower / Opacus that medgen touches (or touched): only the compat
# modules may name them.
PRIVATE_NAMES = {"_current_grad_sample", "max_batch_len", "_close", "_noisy_fraction", "_geometric_update",
                 "_message_id", "pull_objects", "_on_task_tokens_expired"}


def _library(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PUBLIC else None


def internal_uses(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line: what`` for each import of a Flower / Opacus module outside PUBLIC (also through
    importlib / __import__ with a literal name) and each use of a name in PRIVATE_NAMES."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(root)
    found = []

    def check(module: str, node: ast.AST, how: str) -> None:
        lib = _library(module)
        if lib is not None and module not in PUBLIC[lib]:
            found.append(f"{where}:{node.lineno}: {how} {module}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node, "import")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            check(node.module, node, "from")
            if _library(node.module) is not None:  # `from flwr import supercore` reaches a private module too
                for alias in node.names:
                    if _names_a_module(node.module, alias.name):
                        check(f"{node.module}.{alias.name}", node, "from-import")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"}))):
            check(node.args[0].value, node, "dynamic import")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.append(f"{where}:{node.lineno}: attribute .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:
            found.append(f"{where}:{node.lineno}: name {node.value!r}")
    return found


def _names_a_module(package: str, name: str) -> bool:
    """Whether ``from package import name`` imports a module (not, e.g., the function
    ``flwr.simulation.run_simulation``, which shadows a submodule of the same name)."""
    import importlib
    import importlib.util
    import inspect

    try:
        value = getattr(importlib.import_module(package), name, None)
        if value is not None:
            return inspect.ismodule(value)
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def _sources() -> list[Path]:
    files = []
    for folder in ("medgen", "tests", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if COMPAT not in f.parents and f != Path(__file__).resolve()]


def test_only_the_compat_modules_use_flower_or_opacus_internals():
    sources = _sources()
    assert any(f.name == "central.py" for f in sources) and any(f.name == "worker.py" for f in sources)
    found = [use for f in sources for use in internal_uses(f)]
    assert not found, ("Flower / Opacus internals outside medgen/_compat/ (move them into medgen/_compat/flwr.py "
                       "or opacus.py, or add a documented public module to PUBLIC):\n" + "\n".join(found))


def test_the_checker_sees_internal_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import flwr.supernode.start_client_internal as internal\n"
                   "from flwr.supercore.task_identity import TaskIdentity\n"
                   "from flwr import supercore\n"
                   "from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample\n"
                   "import importlib\nimportlib.import_module('flwr.common.serde')\n"
                   "def f(p, m):\n    p._current_grad_sample = 1\n    m.metadata.__dict__['_message_id'] = 2\n")
    good = tmp_path / "good.py"
    good.write_text("import flwr\nfrom flwr.app import Message\nfrom flwr.serverapp.strategy import FedAvg\n"
                    "from opacus import GradSampleModule\nfrom opacus.accountants.utils import get_noise_multiplier\n"
                    "from medgen._compat.flwr import TaskIdentity\n")
    assert [u.split(": ", 1)[1] for u in internal_uses(bad, tmp_path)] == [
        "import flwr.supernode.start_client_internal", "from flwr.supercore.task_identity",
        "from-import flwr.supercore", "from opacus.grad_sample.grad_sample_module",
        "dynamic import flwr.common.serde", "attribute ._current_grad_sample", "name '_message_id'"]
    assert internal_uses(good, tmp_path) == []


@pytest.mark.parametrize("installed", ["1.42.0", "1.42.0rc1", "2.0", "1.40.9", "1.4.1", "banana"])
def test_a_flower_version_outside_the_tested_range_is_refused_by_name(installed):
    from medgen._compat import flwr as compat

    with pytest.raises(IncompatibleVersion) as e:
        check_version("flwr", installed, compat.MINIMUM, compat.BELOW, "medgen/_compat/flwr.py")
    message = str(e.value)
    assert "flwr>=1.41,<1.42" in message and installed in message
    assert isinstance(e.value, ImportError)  # what an import of medgen/_compat/flwr.py raises


@pytest.mark.parametrize("installed", ["1.7.0", "1.5.2", "0.16"])
def test_an_opacus_version_outside_the_tested_range_is_refused_by_name(installed):
    from medgen._compat import opacus as compat

    with pytest.raises(IncompatibleVersion, match=rf"opacus {installed} is installed.*opacus>=1\.6,<1\.7"):
        check_version("opacus", installed, compat.MINIMUM, compat.BELOW, "medgen/_compat/opacus.py")


@pytest.mark.parametrize("installed", ["2.56.0", "2.56.0rc1", "2.54.9", "3.0", "banana"])
def test_a_ray_version_outside_the_tested_range_is_refused_by_name(installed):
    from medgen._compat import ray as compat

    with pytest.raises(IncompatibleVersion) as e:
        check_version("ray", installed, compat.MINIMUM, compat.BELOW, "medgen/_compat/ray.py")
    assert "ray>=2.55,<2.56" in str(e.value) and installed in str(e.value)


def test_importing_the_ray_compat_module_checks_the_installed_ray(monkeypatch):
    """The installed and the pinned ray pass; the module refuses to import with another ray
    installed (its metadata says 2.56.0) or none, as flwr.py and opacus.py do."""
    import importlib
    import importlib.metadata

    from medgen._compat import ray as compat

    assert compat.INSTALLED == importlib.metadata.version("ray")
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    check_version("ray", pins["ray"], compat.MINIMUM, compat.BELOW, "constraints.txt")
    real = importlib.metadata.version

    def other(version):
        def fake(name):
            if name != "ray":
                return real(name)
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return fake

    try:
        monkeypatch.setattr(importlib.metadata, "version", other("2.56.0"))
        with pytest.raises(IncompatibleVersion, match=r"ray 2\.56\.0 is installed.*ray>=2\.55,<2\.56"):
            importlib.reload(compat)
        monkeypatch.setattr(importlib.metadata, "version", other(None))
        with pytest.raises(IncompatibleVersion, match="ray is not installed"):
            importlib.reload(compat)
    finally:
        monkeypatch.undo()
        importlib.reload(compat)
    assert compat.ray_environment(None)["RAY_ADDRESS"] == "local"


@pytest.mark.parametrize("installed", ["1.41.0", "1.41", "1.41.7", "1.41.0.post1", "1.41.1rc2"])
def test_versions_inside_the_range_pass(installed):
    assert check_version("flwr", installed, "1.41", "1.42", "test") == installed


def test_the_installed_versions_pass_and_pyproject_bounds_them_the_same_way():
    from medgen._compat import flwr as flwr_compat
    from medgen._compat import opacus as opacus_compat

    check_version("flwr", flwr.__version__, flwr_compat.MINIMUM, flwr_compat.BELOW, "")
    check_version("opacus", opacus.__version__, opacus_compat.MINIMUM, opacus_compat.BELOW, "")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr[simulation]>={flwr_compat.MINIMUM},<{flwr_compat.BELOW}" in deps
    assert f"opacus>={opacus_compat.MINIMUM},<{opacus_compat.BELOW}" in deps
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    check_version("flwr", pins["flwr"], flwr_compat.MINIMUM, flwr_compat.BELOW, "constraints.txt")
    check_version("opacus", pins["opacus"], opacus_compat.MINIMUM, opacus_compat.BELOW, "constraints.txt")


def test_the_compat_names_resolve():
    """Every Flower internal the compat module lists exists in the installed flwr (what a new flwr
    patch release would break first)."""
    from medgen._compat import flwr as compat

    for name in compat._FROM:
        assert getattr(compat, name) is not None, name
    with pytest.raises(AttributeError):
        compat.not_a_flower_name


def _train_message(run_id: int, message_id: str):
    import time

    from flwr.app import Message, RecordDict
    from flwr.app.metadata import Metadata

    meta = Metadata(run_id=run_id, message_id=message_id, src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60, message_type="train")
    return Message(metadata=meta, content=RecordDict())


def test_a_message_whose_task_died_before_reading_it_is_answered():
    """A site's worker SIGKILLed between starting its task and reading the message (CI caught this
    under load): Flower's SuperNode state left the message with no task and no reply, and the
    SuperNode, which waits for a reply before it pulls the next message, never served the study again.
    With answer_orphaned_messages() the expired task's message gets Flower's "ClientApp crashed"
    reply; a message that a pending task will still read is left alone."""
    import time

    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from medgen._compat.flwr import answer_orphaned_messages, heartbeat_intervals, use_heartbeat

    def died_before_reading(state, run_id: int, message_id: str) -> None:
        task = state.create_task(task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash="fab")
        state.store_message(_train_message(run_id, message_id))
        assert state.claim_task(task) and state.activate_task(task)

    before = heartbeat_intervals()
    original = InMemoryNodeState._on_task_tokens_expired
    try:
        use_heartbeat(0.05)  # the task's token expires after 2 missed heartbeats
        flowers = InMemoryNodeState(ObjectStoreFactory().store())
        died_before_reading(flowers, 7, "m1")
        time.sleep(0.3)
        assert flowers.get_messages_legacy(is_reply=True) == []  # what Flower does: the SuperNode waits for ever

        answer_orphaned_messages()
        answer_orphaned_messages()  # twice is once
        ours = InMemoryNodeState(ObjectStoreFactory().store())
        died_before_reading(ours, 7, "m1")
        died_before_reading(ours, 8, "m2")
        waiting = ours.create_task(task_type=TaskType.CLIENT_APP, run_id=8, fab_hash="fab")  # run 8 has a live task
        time.sleep(0.3)
        replies = ours.get_messages_legacy(is_reply=True)
        assert [(r.metadata.reply_to_message_id, r.has_error()) for r in replies] == [("m1", True)]
        assert "stopped responding" in replies[0].error.reason
        assert ours.get_messages_legacy(run_ids=[8], is_reply=False)[0].metadata.message_id == "m2"
        assert ours.claim_task(waiting)
    finally:
        InMemoryNodeState._on_task_tokens_expired = original
        for seconds in set(before.values()):
            use_heartbeat(seconds)


def test_the_simulation_grid_pulls_at_the_interval_asked_for():
    """`medgen simulate`'s ServerApp sets the pull interval of Flower's simulation Grid (in-memory);
    any other Grid (a deployment's) is left as it is."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from medgen._compat.flwr import quick_simulation_pulls
    from medgen.simulation import GRID_PULL_S

    grid = InMemoryGrid(LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()))
    assert grid.pull_interval == 0.1  # Flower's default, which the ServerApp replaces
    assert quick_simulation_pulls(grid, GRID_PULL_S) and grid.pull_interval == GRID_PULL_S == 0.02
    other = type("DeployedGrid", (), {"pull_interval": 3.0})()
    assert not quick_simulation_pulls(other, GRID_PULL_S) and other.pull_interval == 3.0


def test_a_supernode_retries_the_superlink_within_seconds():
    """medgen's SuperNode retries an unreachable SuperLink after 0.25 s, ×1.5, at most 2 s apart
    (Flower: 1 s doubling to 20 s), so a site started before the server joins soon after it is up."""
    import flwr.supercore.retry.http_retry as http_retry

    from medgen._compat.flwr import quick_reconnect

    flowers = http_retry.exponential
    try:
        quick_reconnect(0.25, 2.0)
        waits = http_retry.make_simple_http_retry_invoker().wait_gen_factory()
        got = [next(waits) for _ in range(10)]
    finally:
        http_retry.exponential = flowers
    assert got[:3] == [0.25, 0.375, 0.5625] and max(got) == 2.0 and got[-1] == 2.0


def test_a_grids_object_pulls_end_with_the_exchange(monkeypatch):
    """The server's pulls of a reply's objects retry from 0.05 s and stop at the exchange's
    deadline (Flower: up to 2 hours), so a site that died mid-upload cannot hold up the replies of
    the others beyond the round timeout."""
    import types

    from medgen._compat.flwr import quick_object_pulls

    calls = []
    module = types.ModuleType("fake_grid_module")
    module.pull_objects = lambda *args, **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "fake_grid_module", module)
    grid = type("FakeGrid", (), {"__module__": "fake_grid_module"})()
    end = [time.monotonic() + 7.0]
    quick_object_pulls(grid, {"initial_backoff": 0.05, "backoff_cap": 0.5}, lambda: end[0])
    module.pull_objects(["id"], pull_object_fn=None)
    assert calls[-1]["initial_backoff"] == 0.05 and 6.0 < calls[-1]["max_time"] <= 7.0
    end[0] = time.monotonic() - 3.0  # past the deadline: one short last try
    module.pull_objects(["id"])
    assert calls[-1]["max_time"] == 0.5
    quick_object_pulls(grid, {"initial_backoff": 0.05, "backoff_cap": 0.5}, lambda: None)  # a later Grid
    module.pull_objects(["id"])
    assert "max_time" not in calls[-1] and len(calls) == 3
