"""``flower-supernode`` with a shorter idle poll (``python -m fedge._supernode <its arguments>``).

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink returns no
message (``flwr.supernode.start_client_internal``), so each message of a round waits on
average 1.5 s before the device even sees it. This entry point runs the same SuperNode
with that idle sleep set to ``FEDGE_SUPERNODE_POLL_S`` (default 0.5 s). Only the module's
own view of ``time`` is replaced; the rest of the process keeps the real ``time.sleep``.

``--fedge-worker <socket>`` also starts the device's warm ClientApp worker
(``clients/worker.py``) as a child, so it lives and dies with the SuperNode.
"""

from __future__ import annotations

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


def main() -> None:
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sci.time = _patched_time(float(os.environ.get(POLL_ENV, "0.5")))
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
