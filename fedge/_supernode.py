"""``flower-supernode`` with a shorter idle poll (``python -m fedge._supernode <its arguments>``).

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink returns no
message (``flwr.supernode.start_client_internal``), so each message of a round waits on
average 1.5 s before the device even sees it. This entry point runs the same SuperNode
with that idle sleep set to ``FEDGE_SUPERNODE_POLL_S`` (default 0.5 s). Only the module's
own view of ``time`` is replaced; the rest of the process keeps the real ``time.sleep``.

``--fedge-worker <socket>`` also starts the device's warm ClientApp worker
(``clients/worker.py``) as a child, so it lives and dies with the SuperNode.

``--fedge-trusted-key <public key>`` makes the node run only app bundles signed by that key
(``fedge.appsign``): before Flower stores a run's bundle, and so before any ClientApp process
can start from it, the bundle's signature (run config ``fedge-app-signature``) is checked; a
refused bundle gets Flower's own "FAB could not be verified" error reply and is never stored.
Flower's ``--trusted-entities`` cannot do this for bundles submitted with ``flwr run <dir>``
(it accepts only bundles the Flower platform verified). The hook uses two module-level names
of ``flwr.supernode.start_client_internal`` (1.42): if they change, the node refuses to start.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import types

POLL_ENV = "FEDGE_SUPERNODE_POLL_S"
FLOWER_IDLE_S = 3  # the constant in start_client_internal's loop


def _patched_time(poll_s: float) -> types.ModuleType:
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = lambda s: time.sleep(poll_s if s == FLOWER_IDLE_S else s)
    return shim


def install_app_check(sci: types.ModuleType, trusted_key: str) -> None:
    """Make Flower's SuperNode loop refuse bundles not signed by ``trusted_key`` (see the module docstring).

    Flower's loop calls ``_pull_and_store_message(..., get_run, get_fab, trusted_entities)`` and,
    when ``trusted_entities`` is set, refuses a bundle unless ``_verify_fab(fab, entities)`` is true.
    We give it a non-empty ``trusted_entities`` and a ``_verify_fab`` that returns fedge's verdict.
    """
    from fedge.appsign import RUN_APP_SIGNATURE, AppRefused, verify_fab
    from fedge.export.signing import fingerprint, load_public_key

    key = load_public_key(trusted_key)  # an unreadable key stops the node now, not at the first run
    pull = getattr(sci, "_pull_and_store_message", None)
    if pull is None or not hasattr(sci, "_verify_fab") or \
            not {"get_run", "get_fab", "trusted_entities"} <= set(inspect.signature(pull).parameters):
        raise SystemExit("fedge: this Flower version's SuperNode has no hook for app-bundle signatures; "
                         "refusing to start with --fedge-trusted-key")
    log = logging.getLogger("flwr")  # Flower's logger: the verdict lands in supernode.log next to its lines
    runs: dict[int, object] = {}
    verdicts: dict[int, bool] = {}  # id(fab) -> verified

    def checked_pull(*args, **kw):
        get_run, get_fab = kw["get_run"], kw["get_fab"]

        def get_run_(run_id: int):
            runs[run_id] = run = get_run(run_id)
            return run

        def get_fab_(fab_hash: str, run_id: int):
            fab = get_fab(fab_hash, run_id)
            run = runs.pop(run_id, None)
            signature = getattr(run, "override_config", {}).get(RUN_APP_SIGNATURE) if run is not None else None
            try:
                digest = verify_fab(fab.content, signature, key)
                ok = digest == fab_hash  # the bundle is the one the run names
                if ok:
                    log.info("fedge: app bundle %s signed by the pinned key: accepted", digest[:12])
                else:
                    log.error("fedge: refused app bundle: its sha256 is not the run's fab hash %s", fab_hash[:12])
            except AppRefused as err:
                ok = False
                log.error("fedge: refused app bundle (%s): %s", err.reason, err)
            verdicts[id(fab)] = ok
            fab.verifications = {"valid_license": "fedge"}  # passes Flower's platform-only gate to _verify_fab
            return fab

        kw.update(get_run=get_run_, get_fab=get_fab_, trusted_entities={"fedge": fingerprint(key)})
        return pull(*args, **kw)

    def fedge_verify_fab(fab, trusted_entities) -> bool:
        return verdicts.pop(id(fab), False)

    sci._pull_and_store_message = checked_pull
    sci._verify_fab = fedge_verify_fab


def main() -> None:
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sci.time = _patched_time(float(os.environ.get(POLL_ENV, "0.5")))
    if "--fedge-trusted-key" in sys.argv:  # run only app bundles the operator signed
        i = sys.argv.index("--fedge-trusted-key")
        install_app_check(sci, sys.argv[i + 1])
        del sys.argv[i:i + 2]
    if "--fedge-worker" in sys.argv:  # the device's warm ClientApp (clients/worker.py), in this process group
        i = sys.argv.index("--fedge-worker")
        path = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        import subprocess

        subprocess.Popen([sys.executable, "-m", "clients.worker", "--socket", path, "--parent-pid", str(os.getpid())])
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
