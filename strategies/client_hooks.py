"""Client halves of algorithms: what a round config asks a client to do, registered by key.

An algorithm lives in one module: its server ``Strategy`` and, when the client must do
something besides plain local training, a ``ClientHook`` registered next to it under
the one round-config key the strategy sends (``fedge.protocol``):

    @client_hook
    class FreezeA(ClientHook):
        key = P.CFG_FREEZE_A            # present and not False in the round config: active
        order = 20                      # hooks enter (and finish) in ascending order

        @staticmethod
        def enter(peft_model, conf, context, content, stack):
            ...                          # set up for the round; stack.callback(undo)
            return finish                # finish(delta, metrics) -> (delta to send, extra reply records)

The client app (``clients/app.py``) builds its PEFT model at :func:`client_lora`'s
rank and wraps its local round in :func:`client_round`:

    with client_round(peft, conf, context, msg.content) as hooks:
        ... local training ...
        delta, extra_records = hooks.finish(delta, metrics)

Without any registered key in the config the hooks do nothing. Registered today:

==================  ======  =========================  ==============================================
key                 order   module                     client behaviour during the round
==================  ======  =========================  ==============================================
CFG_LORA_EXACT      10      ``lora_exact.py``          W0 ← W0 + s·R per module (record LORA_RESIDUAL),
                                                       restored bit for bit on exit
CFG_FREEZE_A        20      ``ffa_lora.py``            lora_A frozen; the reply omits lora_A
CFG_FREEZE_ADAPTER  20      ``head_only.py``           lora_A and lora_B frozen; the reply is the head
CFG_SCAFFOLD        30      ``scaffold.py``            g ← g + (c − c_i); reply adds Δc_i; c_i kept
CFG_HETLORA         40      ``hetlora.py``             train at rank r_i; the reply declares r_i
CFG_DP_CLIP_NORM    90      ``dp_user_level.py``       Δ clipped to ‖Δ‖ ≤ S last, before it leaves
==================  ======  =========================  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import numpy as np

State = dict[str, np.ndarray]
Extra = dict[str, Any]  # extra Flower records for the reply, by RecordDict key
Finisher = Callable[[State, Any], tuple[State, Extra]]  # (delta, reply metrics) -> (delta, extra records)

_HOOKS: dict[str, type[ClientHook]] = {}


class ClientHook:
    """An algorithm's client half, active when its ``key`` is in the round config (and not False)."""

    key: ClassVar[str]
    order: ClassVar[int] = 50

    @staticmethod
    def lora(conf: Any, context: Any, r: int, alpha: float) -> tuple[int, float]:
        """(rank, alpha) to build this client's PEFT model with, given the round config's."""
        return r, alpha

    @staticmethod
    def enter(peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> Finisher | None:
        """Set up for the round (undo through ``stack``); return a finisher or None."""
        return None


def client_hook(cls: type[ClientHook]) -> type[ClientHook]:
    """Class decorator: register ``cls`` under ``cls.key``; a second class for a key is refused."""
    if cls.key in _HOOKS and _HOOKS[cls.key] is not cls:
        raise ValueError(f"client hook key {cls.key!r} is already registered by {_HOOKS[cls.key].__qualname__}")
    _HOOKS[cls.key] = cls
    return cls


def registered() -> dict[str, type[ClientHook]]:
    """key -> hook class of every built-in algorithm with a client half."""
    from strategies import dp_user_level  # noqa: F401  (a wrapper, not in the name registry)
    from strategies.registry import available

    available()  # imports every built-in algorithm module, which registers its hook
    return dict(_HOOKS)


def active(conf: Any) -> list[type[ClientHook]]:
    """The hooks the round config selects, in their order."""
    return sorted((h for k, h in registered().items() if k in conf and conf[k] is not False),
                  key=lambda h: h.order)


def need_content(content: Any, what: str) -> None:
    """Refuse a hook that needs the train message's extra records when none were passed."""
    if content is None:
        raise ValueError(f"{what} needs the train message's records: call "
                         "client_round(peft, conf, context, msg.content)")


def client_lora(conf: Any, context: Any) -> tuple[int, float]:
    """(rank, alpha) this client builds its PEFT model with: the round config's, as the hooks adjust them."""
    from fedge import protocol as P

    r, alpha = int(conf[P.CFG_LORA_R]), float(conf[P.CFG_LORA_ALPHA])
    for hook in active(conf):
        r, alpha = hook.lora(conf, context, r, alpha)
    return r, alpha


class RoundHooks:
    """What :func:`client_round` yields: ``finish(delta, metrics) -> (delta to send, extra reply records)``."""

    def __init__(self) -> None:
        self.finishers: list[Finisher] = []

    def finish(self, delta: State, metrics: Any = None) -> tuple[State, Extra]:
        extra: Extra = {}
        metrics = {} if metrics is None else metrics
        for f in self.finishers:
            delta, more = f(delta, metrics)
            extra.update(more)
        return delta, extra


@contextmanager
def client_round(peft_model: Any, conf: Any, context: Any, content: Any = None) -> Iterator[RoundHooks]:
    """Set up every hook the round config selects; undo them all on exit (even on error).

    ``content``: the train message's ``RecordDict`` (extra records such as SCAFFOLD's c or
    FedEx-LoRA's residual).
    """
    hooks = RoundHooks()
    with ExitStack() as stack:
        for hook in active(conf):
            finish = hook.enter(peft_model, conf, context, content, stack)
            if finish is not None:
                hooks.finishers.append(finish)
        yield hooks
