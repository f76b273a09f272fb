"""``flower-supernode`` with a shorter idle poll (``python -m fedge._supernode <its arguments>``).

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink returns no
message (``flwr.supernode.start_client_internal``), so each message of a round waits on
average 1.5 s before the device even sees it. This entry point runs the same SuperNode
with that idle sleep set to ``FEDGE_SUPERNODE_POLL_S`` (default 0.5 s). Only the module's
own view of ``time`` is replaced; the rest of the process keeps the real ``time.sleep``.
Both patches live in ``fedge.flower_patches``, which checks the installed Flower first.

``--fedge-worker <socket>`` also starts the device's warm ClientApp worker
(``clients/worker.py``) as a child, so it lives and dies with the SuperNode.

``--fedge-trusted-key <public key>`` makes the node run only app bundles signed by that key
(``fedge.appsign``): before Flower stores a run's bundle, and so before any ClientApp process
can start from it, the bundle's signature (run config ``fedge-app-signature``) is checked; a
refused bundle gets Flower's own "FAB could not be verified" error reply and is never stored.
Flower's ``--trusted-entities`` cannot do this for bundles submitted with ``flwr run <dir>``
(it accepts only bundles the Flower platform verified). The hook uses two module-level names
of ``flwr.supernode.start_client_internal`` (1.42): if they change, the node refuses to start
(no fallback: running unsigned bundles is what the key is there to prevent).
"""

from __future__ import annotations

import os
import sys

from fedge import flower_patches

POLL_ENV = "FEDGE_SUPERNODE_POLL_S"


def main() -> None:
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # Checked against the installed Flower; on a mismatch the node keeps Flower's 3 s poll.
    flower_patches.install_supernode_idle_poll(float(os.environ.get(POLL_ENV, "0.5")), sci)
    if "--fedge-trusted-key" in sys.argv:  # run only app bundles the operator signed
        i = sys.argv.index("--fedge-trusted-key")
        try:
            flower_patches.install_app_check(sci, sys.argv[i + 1])
        except flower_patches.FlowerContractError as err:  # no safe fallback: the node does not start
            raise SystemExit(f"fedge: {err}") from None
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
