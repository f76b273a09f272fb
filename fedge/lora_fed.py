"""Client-side hooks for LoRA-aware federated algorithms (FFA-LoRA, SCAFFOLD, ...).

The server's strategy asks for client behaviour through round-config keys;
the client app wraps its local round in :func:`client_round`:

    with client_round(peft, conf, context) as hooks:
        ... local training ...
        delta, extra_records = hooks.finish(delta)

``finish`` returns the delta to send (possibly a subset of tensors) and extra
Flower records to add to the reply (e.g. SCAFFOLD control-variate deltas).
Without any such key the hooks do nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


class RoundHooks:
    """Default: send the full delta, no extra records."""

    def finish(self, delta: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        return delta, {}


@contextmanager
def client_round(peft_model, conf, context):
    """Set up the client behaviour a round config asks for; undo it on exit."""
    yield RoundHooks()
