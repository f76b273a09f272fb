"""Every place fedge changes Flower's internals, each checked before it is applied.

fedge speeds Flower up (or hooks into it) in four places that no public API covers. Each
relies on private Flower code, so each has a ``check_*`` function that reads the installed
Flower version and exactly the signatures, members and source lines the patch relies on,
and an installer that applies the patch only when the check says ``apply``. On a mismatch
the installer logs why and leaves Flower's own behaviour in place (slower, still correct);
only the app-bundle signature check, which cannot be skipped safely, raises instead.

* ``one-sweep-delivery``: the simulation engine's message delivery
  (``vce_api.add_messages_to_queue``) in one pass over the in-memory store per sweep.
* ``supernode-idle-poll``: the SuperNode's 3 s idle sleep shortened (``fedge._supernode``).
* ``task-identity``: the device's warm worker plays the task of the forwarding
  ``flwr-clientapp`` process (``clients/worker.py``).
* ``app-check``: the SuperNode refuses app bundles not signed by the operator's key.

``tests/test_flower_patches.py`` holds one canary per patch; docs/design.md ("Flower
internals we rely on") says what each costs when it falls back.
"""

from __future__ import annotations

import ast
import inspect
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)

# The Flower releases these patches were written and checked against (pyproject pins the same).
FLOWER_RANGE = ">=1.42,<1.43"


class FlowerContractError(RuntimeError):
    """A patch that cannot fall back found Flower's internals changed."""


@dataclass(frozen=True)
class Verdict:
    """What a check decided for one patch, and why."""

    patch: str
    action: Literal["apply", "fallback"]
    reason: str

    @property
    def ok(self) -> bool:
        return self.action == "apply"


def _verdict(patch: str, problems: list[str], version: str) -> Verdict:
    if problems:
        return Verdict(patch, "fallback", f"Flower {version}: " + "; ".join(problems))
    return Verdict(patch, "apply", f"Flower {version} matches what the patch relies on")


def _version_problems(version: str | None) -> tuple[str, list[str]]:
    """(the version, [why it is outside FLOWER_RANGE]); ``version`` defaults to the installed one."""
    if version is None:
        import flwr

        version = str(flwr.__version__)
    try:
        inside = Version(version) in SpecifierSet(FLOWER_RANGE)
    except InvalidVersion:
        inside = False
    return version, [] if inside else [f"version {version} is outside {FLOWER_RANGE}, the range the patch was written for"]


def _params(fn: object) -> list[str] | None:
    try:
        return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _source(obj: object) -> str | None:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None


def _missing_markers(obj: object, name: str, markers: tuple[str, ...]) -> list[str]:
    """Source lines the patch copies or relies on that ``obj`` no longer contains."""
    src = _source(obj)
    if src is None:
        return [f"the source of {name} is not available to check"]
    return [f"{name} no longer contains {m!r}" for m in markers if m not in src]


# -- one-sweep-delivery: simulations/runner.py ----------------------------------------------------

DELIVERY = "one-sweep-delivery"
DELIVERY_PARAMS = ["state", "queue", "nodes_mapping", "f_stop"]
# run_api starts its extractor thread with the module-level name, so replacing the module
# attribute before the engine starts reaches it.
RUN_API_MARKERS = ("target=add_messages_to_queue",)
# The members the replacement reads, and the delivery rule it copies from get_message_ins.
LINKSTATE_INIT_MARKERS = ("self.lock =", "self.message_ins_store:")
GET_MESSAGE_INS_MARKERS = ("self._check_stored_messages(", "msg_ins.metadata.dst_node_id == node_id",
                           'msg_ins.metadata.delivered_at == ""', "msg_ins.metadata.delivered_at = delivered_at")


def check_one_sweep_delivery(vce_api: Any = None, linkstate_cls: Any = None, version: str | None = None) -> Verdict:
    """Does Flower's simulation delivery still look the way ``one_sweep_delivery`` assumes?"""
    if vce_api is None:
        from flwr.server.superlink.fleet.vce import vce_api
    if linkstate_cls is None:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState as linkstate_cls
    version, problems = _version_problems(version)
    fn = getattr(vce_api, "add_messages_to_queue", None)
    if fn is None:
        problems.append("vce_api.add_messages_to_queue is gone")
    elif _params(fn) != DELIVERY_PARAMS:
        problems.append(f"vce_api.add_messages_to_queue takes {_params(fn)}, not {DELIVERY_PARAMS}")
    problems += _missing_markers(getattr(vce_api, "run_api", None), "vce_api.run_api", RUN_API_MARKERS)
    if (_params(getattr(linkstate_cls, "_check_stored_messages", None)) or [])[:2] != ["self", "message_ids"]:
        problems.append("InMemoryLinkState._check_stored_messages(self, message_ids, ...) changed")
    problems += _missing_markers(getattr(linkstate_cls, "__init__", None), "InMemoryLinkState.__init__",
                                 LINKSTATE_INIT_MARKERS)
    problems += _missing_markers(getattr(linkstate_cls, "get_message_ins", None), "InMemoryLinkState.get_message_ins",
                                 GET_MESSAGE_INS_MARKERS)
    try:
        from flwr.supercore.date import now  # noqa: F401 - the delivery timestamp Flower uses
    except ImportError:
        problems.append("flwr.supercore.date.now is gone")
    return _verdict(DELIVERY, problems, version)


def _one_sweep_delivery(flower_fn: Callable[..., None]) -> Callable[..., None]:
    """Drop-in for Flower 1.42's ``vce_api.add_messages_to_queue`` with one pass per sweep.

    Flower's version asks the in-memory LinkState once per registered node, and each ask
    scans every stored message: O(nodes x messages) every 0.1 s, which stalls a federation
    of 10,000 virtual clients. This scans the store once per sweep and hands every
    undelivered message addressed to a simulated node to the engine (same delivery rule:
    expired and foreign messages are dropped by the state's own check; each message once).
    Other LinkState kinds keep Flower's function (``flower_fn``).
    """
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        if not isinstance(state, InMemoryLinkState):
            return flower_fn(state, queue, nodes_mapping, f_stop)
        while not f_stop.is_set():
            batch = []
            with state.lock:
                state._check_stored_messages(set(state.message_ins_store))
                stamp = now().isoformat()
                for msg in list(state.message_ins_store.values()):
                    md = msg.metadata
                    if md.delivered_at == "" and md.dst_node_id in nodes_mapping:
                        md.delivered_at = stamp
                        batch.append(msg)
            for msg in batch:
                queue.put(msg)
            f_stop.wait(0.1)
        return None

    add_messages_to_queue.fedge_patch = DELIVERY  # type: ignore[attr-defined]
    add_messages_to_queue.flower_fn = flower_fn  # type: ignore[attr-defined]
    return add_messages_to_queue


def install_one_sweep_delivery(vce_api: Any = None, linkstate_cls: Any = None, version: str | None = None) -> bool:
    """Replace ``vce_api.add_messages_to_queue`` (process-wide) if the check allows; True if in place.

    Idempotent. On a mismatch Flower's per-node delivery stays: correct, but a sweep costs
    O(nodes x messages), which is slow with thousands of virtual clients.
    """
    if vce_api is None:
        from flwr.server.superlink.fleet.vce import vce_api
    if getattr(vce_api.add_messages_to_queue, "fedge_patch", None) == DELIVERY:
        return True
    verdict = check_one_sweep_delivery(vce_api, linkstate_cls, version)
    if not verdict.ok:
        log.warning("fedge: not applying %s (%s); Flower's per-node message delivery stays (slower with "
                    "many virtual clients, same messages)", DELIVERY, verdict.reason)
        return False
    vce_api.add_messages_to_queue = _one_sweep_delivery(vce_api.add_messages_to_queue)
    log.info("fedge: applied %s (%s)", DELIVERY, verdict.reason)
    return True


# -- supernode-idle-poll: fedge/_supernode.py -------------------------------------------------------

IDLE_POLL = "supernode-idle-poll"
FLOWER_IDLE_S = 3  # the constant in start_client_internal's loop


def _is_time_sleep(node: ast.AST) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return isinstance(f, ast.Attribute) and f.attr == "sleep" and isinstance(f.value, ast.Name) and f.value.id == "time"


def _idle_sleeps(tree: ast.AST) -> tuple[int, int]:
    """(every ``time.sleep(FLOWER_IDLE_S)`` in the module, those that are the idle poll).

    The idle poll is the one in ``start_client_internal`` under ``if run_id is None:``
    (no message pulled). Our shim shortens every 3 s sleep of the module, so it must be the only one.
    """
    def is_idle(call: ast.AST) -> bool:
        return (_is_time_sleep(call) and len(call.args) == 1  # type: ignore[attr-defined]
                and isinstance(call.args[0], ast.Constant)  # type: ignore[attr-defined]
                and call.args[0].value == FLOWER_IDLE_S)  # type: ignore[attr-defined]

    total = sum(is_idle(n) for n in ast.walk(tree))
    in_branch = 0
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == "start_client_internal":
            for node in ast.walk(fn):
                if isinstance(node, ast.If) and ast.unparse(node.test) == "run_id is None":
                    in_branch += sum(is_idle(s.value) for s in node.body if isinstance(s, ast.Expr))
    return total, in_branch


def check_supernode_idle_poll(sci: Any = None, version: str | None = None) -> Verdict:
    """Is the SuperNode's only 3 s sleep still its idle poll, reached through the module's ``time``?"""
    if sci is None:
        import flwr.supernode.start_client_internal as sci
    version, problems = _version_problems(version)
    t = getattr(sci, "time", None)
    if t is not time and getattr(t, "fedge_patch", None) != IDLE_POLL:
        problems.append("start_client_internal no longer imports the time module as `time`")
    src = _source(sci)
    if src is None:
        problems.append("the source of start_client_internal is not available to check")
    else:
        total, idle = _idle_sleeps(ast.parse(src))
        if (total, idle) != (1, 1):
            problems.append(f"start_client_internal has {total} time.sleep({FLOWER_IDLE_S}) calls, {idle} of them "
                            "under `if run_id is None:` (expected exactly one, the idle poll)")
    return _verdict(IDLE_POLL, problems, version)


def _patched_time(poll_s: float) -> types.ModuleType:
    """A copy of ``time`` whose ``sleep(FLOWER_IDLE_S)`` sleeps ``poll_s``; other sleeps unchanged."""
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = lambda s: time.sleep(poll_s if s == FLOWER_IDLE_S else s)  # type: ignore[attr-defined]
    shim.fedge_patch = IDLE_POLL  # type: ignore[attr-defined]
    return shim


def install_supernode_idle_poll(poll_s: float, sci: Any = None, version: str | None = None) -> bool:
    """Make the SuperNode's idle poll ``poll_s`` instead of 3 s if the check allows; True if applied.

    Only ``start_client_internal``'s own view of ``time`` is replaced; the rest of the process
    keeps the real ``time.sleep``. On a mismatch each message waits about 1.25 s more on average.
    """
    if sci is None:
        import flwr.supernode.start_client_internal as sci
    verdict = check_supernode_idle_poll(sci, version)
    if not verdict.ok:
        log.warning("fedge: not applying %s (%s); the SuperNode keeps Flower's %d s idle poll", IDLE_POLL,
                    verdict.reason, FLOWER_IDLE_S)
        return False
    sci.time = _patched_time(poll_s)
    log.info("fedge: applied %s: idle poll %.2f s instead of %d s (%s)", IDLE_POLL, poll_s, FLOWER_IDLE_S,
             verdict.reason)
    return True


# -- task-identity: clients/worker.py --------------------------------------------------------------

TASK_IDENTITY = "task-identity"
IDENTITY_FIELDS = ("task_id", "run_id", "node_id")


def check_task_identity(cls: Any = None, message_module: Any = None, version: str | None = None) -> Verdict:
    """Can a process outside Flower's runtime still set the task identity that new Messages read?"""
    if cls is None:
        from flwr.supercore.task_identity import TaskIdentity as cls
    if message_module is None:
        import flwr.app.message.message as message_module
    version, problems = _version_problems(version)
    for name in IDENTITY_FIELDS:
        prop = getattr(type(cls), name, None)
        if not isinstance(prop, property) or prop.fset is None:
            problems.append(f"TaskIdentity.{name} is no longer a settable class property")
    if getattr(message_module, "TaskIdentity", None) is not cls:
        problems.append("flwr.app.message.message no longer reads flwr.supercore.task_identity.TaskIdentity")
    return _verdict(TASK_IDENTITY, problems, version)


def install_task_identity(cls: Any = None, message_module: Any = None, version: str | None = None) -> bool:
    """Check once, before the worker serves, that ``play_task`` will work; True if it will.

    On a mismatch the worker does not serve: the device's ``flwr-clientapp`` processes then
    handle each message themselves (same replies, 5-8 s more per message to load the model).
    """
    verdict = check_task_identity(cls, message_module, version)
    if not verdict.ok:
        log.warning("fedge: not applying %s (%s); the warm worker stays off and each ClientApp process "
                    "handles its message itself", TASK_IDENTITY, verdict.reason)
        return False
    log.info("fedge: applied %s (%s)", TASK_IDENTITY, verdict.reason)
    return True


def play_task(run_id: int, node_id: int, cls: Any = None) -> None:
    """Set the identity new Messages are stamped with, as Flower's ``run_clientapp`` does for its task.

    Messages are created inside a task: the worker plays the task of the process that forwarded
    the message (call after ``install_task_identity`` returned True).
    """
    if cls is None:
        from flwr.supercore.task_identity import TaskIdentity as cls
    cls.task_id, cls.run_id, cls.node_id = 1, run_id, node_id


# -- app-check: fedge/_supernode.py --fedge-trusted-key ----------------------------------------------

APP_CHECK = "app-check"
PULL_PARAMS = {"get_run", "get_fab", "trusted_entities"}
# Flower refuses a bundle unless _verify_fab(fab, entities) is true, and only when the bundle
# carries a platform licence mark: the hook answers the first and sets the second.
PULL_MARKERS = ("_verify_fab(fab, trusted_entities)", 'fab.verifications.get("valid_license"')


def _pull_call_keywords(sci: Any) -> set[str] | None:
    """Keywords ``start_client_internal`` passes to ``_pull_and_store_message`` (the hook reads them from ``kw``)."""
    src = _source(sci)
    if src is None:
        return None
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_pull_and_store_message":
            return {k.arg for k in node.keywords if k.arg}
    return set()


def check_app_check(sci: Any = None, version: str | None = None) -> Verdict:
    """Does the SuperNode still pull bundles through the two module-level names the hook replaces?"""
    if sci is None:
        import flwr.supernode.start_client_internal as sci
    version, problems = _version_problems(version)
    pull = getattr(sci, "_pull_and_store_message", None)
    verify = getattr(sci, "_verify_fab", None)
    if pull is None or verify is None:
        problems.append("start_client_internal has no _pull_and_store_message/_verify_fab")
    else:
        if not PULL_PARAMS <= set(_params(pull) or ()):
            problems.append(f"_pull_and_store_message no longer takes {sorted(PULL_PARAMS)}")
        if _params(verify) != ["fab", "trusted_entities"]:
            problems.append(f"_verify_fab takes {_params(verify)}, not ['fab', 'trusted_entities']")
        problems += _missing_markers(pull, "_pull_and_store_message", PULL_MARKERS)
        kws = _pull_call_keywords(sci)
        if kws is None or not PULL_PARAMS <= kws:
            problems.append(f"start_client_internal no longer passes {sorted(PULL_PARAMS)} to "
                            "_pull_and_store_message by keyword")
    return _verdict(APP_CHECK, problems, version)


def install_app_check(sci: Any, trusted_key: str, version: str | None = None) -> None:
    """Make Flower's SuperNode loop refuse bundles not signed by ``trusted_key`` (``fedge._supernode``).

    Flower's loop calls ``_pull_and_store_message(..., get_run, get_fab, trusted_entities)`` and,
    when ``trusted_entities`` is set, refuses a bundle unless ``_verify_fab(fab, entities)`` is true.
    We give it a non-empty ``trusted_entities`` and a ``_verify_fab`` that returns fedge's verdict.
    No fallback: running unsigned bundles is what the operator asked to prevent, so a mismatch
    raises ``FlowerContractError`` and the node does not start.
    """
    from fedge.appsign import RUN_APP_SIGNATURE, AppRefused, verify_fab
    from fedge.export.signing import fingerprint, load_public_key

    key = load_public_key(trusted_key)  # an unreadable key stops the node now, not at the first run
    verdict = check_app_check(sci, version)
    if not verdict.ok:
        raise FlowerContractError(f"this Flower version's SuperNode has no hook for app-bundle signatures "
                                  f"({verdict.reason}); refusing to start with --fedge-trusted-key")
    pull = sci._pull_and_store_message
    flwr_log = logging.getLogger("flwr")  # Flower's logger: the verdict lands in supernode.log next to its lines
    runs: dict[int, object] = {}
    verdicts: dict[int, bool] = {}  # id(fab) -> verified

    def checked_pull(*args: Any, **kw: Any) -> Any:
        get_run, get_fab = kw["get_run"], kw["get_fab"]

        def get_run_(run_id: int) -> Any:
            runs[run_id] = run = get_run(run_id)
            return run

        def get_fab_(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            run = runs.pop(run_id, None)
            signature = getattr(run, "override_config", {}).get(RUN_APP_SIGNATURE) if run is not None else None
            try:
                digest = verify_fab(fab.content, signature, key)
                ok = digest == fab_hash  # the bundle is the one the run names
                if ok:
                    flwr_log.info("fedge: app bundle %s signed by the pinned key: accepted", digest[:12])
                else:
                    flwr_log.error("fedge: refused app bundle: its sha256 is not the run's fab hash %s", fab_hash[:12])
            except AppRefused as err:
                ok = False
                flwr_log.error("fedge: refused app bundle (%s): %s", err.reason, err)
            verdicts[id(fab)] = ok
            fab.verifications = {"valid_license": "fedge"}  # passes Flower's platform-only gate to _verify_fab
            return fab

        kw.update(get_run=get_run_, get_fab=get_fab_, trusted_entities={"fedge": fingerprint(key)})
        return pull(*args, **kw)

    def fedge_verify_fab(fab: Any, trusted_entities: dict[str, str]) -> bool:
        return verdicts.pop(id(fab), False)

    sci._pull_and_store_message = checked_pull
    sci._verify_fab = fedge_verify_fab
    log.info("fedge: applied %s (%s)", APP_CHECK, verdict.reason)
