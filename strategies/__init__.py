"""Aggregation strategies over adapter deltas: one algorithm per file, by name.

>>> from strategies import available, build
>>> sorted(available())            # doctest: +SKIP
>>> build("fedavg", clients_per_round=8)   # doctest: +SKIP
"""

from strategies.base import ClientUpdate, DeltaStrategy, NotEnoughNodes, RoundReport
from strategies.registry import StrategyError, available, build, describe, register, resolve

__all__ = [
    "ClientUpdate",
    "DeltaStrategy",
    "NotEnoughNodes",
    "RoundReport",
    "StrategyError",
    "available",
    "build",
    "describe",
    "register",
    "resolve",
]
