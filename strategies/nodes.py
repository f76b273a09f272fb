"""Who is connected: stable client names and installed artifact versions, by node id.

Node ids are random per run (and per SuperNode restart), so sampling and the order of
aggregation use the names clients give for themselves (``protocol.ID_CLIENT``): the same
seed picks the same clients and sums their deltas in the same order, across runs and
after a resume. The directory also remembers the artifact version each device reported
(``protocol.ID_INSTALLED``), which the redeploy step reads and updates.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedge import protocol as P
from fedge.messaging import send_and_receive

log = logging.getLogger("fedge.strategy")


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than a round needs, after waiting ``wait_nodes_s``."""


class NodeDirectory:
    """node id -> stable client name and installed artifact version, filled by one identity query per new node."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.installed: dict[int, int] = {}  # 0 = no artifact installed

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes not seen before for their name and installed version (one query message each)."""
        unknown = [n for n in nodes if n not in self.names]
        if not unknown:
            return
        msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in send_and_receive(grid, msgs, timeout=60):
            node = int(reply.metadata.src_node_id)
            if not reply.has_error() and P.IDENTITY in reply.content:
                ident = reply.content[P.IDENTITY]
                self.names[node] = str(ident.get(P.ID_CLIENT, node))
                # An int by protocol (ConfigRecord values are a union); int() checks it at run time.
                self.installed[node] = int(cast(int, ident.get(P.ID_INSTALLED, 0)))

    def connected(self, grid: Grid, server_round: int, k: int, *, wait_s: float) -> list[int]:
        """Every connected node id, sorted by client name, once at least k are connected
        (waits up to ``wait_s``, then raises NotEnoughNodes)."""
        deadline, last_log = time.monotonic() + wait_s, 0.0
        while len(nodes := sorted(grid.get_node_ids())) < k:
            now = time.monotonic()
            if now > deadline:
                raise NotEnoughNodes(f"round {server_round}: {len(nodes)} nodes connected, {k} needed; "
                                     f"gave up after {wait_s:.0f} s")
            if now - last_log > 10:
                log.warning("round %d: waiting for nodes: %d connected, %d needed", server_round, len(nodes), k)
                last_log = now
            time.sleep(0.5)
        self.discover(grid, nodes)
        nodes.sort(key=self.name)
        return nodes
