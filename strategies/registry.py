"""Strategies by name: a registry that refuses duplicates, plus import paths.

``build("fedavg", **kw)`` or ``build("my_pkg.module:MyStrategy", **kw)``; an
unknown name lists the valid ones, an unknown parameter lists the accepted ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from strategies.base import DeltaStrategy

S = TypeVar("S", bound="type[DeltaStrategy]")

_REGISTRY: dict[str, type[DeltaStrategy]] = {}


class StrategyError(ValueError):
    """A strategy name or parameter that cannot be used; says what is allowed."""


def register(name: str) -> Callable[[S], S]:
    """Class decorator: register a ``DeltaStrategy`` subclass under ``name``."""

    def deco(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise StrategyError(f"strategy name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # One module per algorithm; importing registers it.
    from strategies import (  # noqa: F401  # noqa: F401  (LoRA-aware)
        bulyan,
        fedadagrad,
        fedadam,
        fedavg,  # noqa: F401
        fedavgm,
        fedprox,
        fedyogi,
        ffa_lora,
        head_only,
        hetlora,
        krum,
        lora_exact,
        median,
        norm_bounding,
        scaffold,
        trimmed_mean,
    )


def available() -> dict[str, type[DeltaStrategy]]:
    """name -> class of every registered strategy."""
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def resolve(name: str) -> type[DeltaStrategy]:
    """Class for a registered name or a ``pkg.module:Class`` import path."""
    from strategies.base import DeltaStrategy

    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as err:
            raise StrategyError(f"strategy.name {name!r}: cannot import ({err})") from None
    else:
        reg = available()
        if name not in reg:
            raise StrategyError(f"strategy.name: unknown strategy {name!r}; available: {sorted(reg)} "
                                "or an import path 'pkg.module:Class'")
        cls = reg[name]
    if not (isinstance(cls, type) and issubclass(cls, DeltaStrategy)):
        raise StrategyError(f"strategy.name {name!r} is not a strategies.base.DeltaStrategy subclass")
    return cls


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters a strategy accepts (its own and the base class's)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
                if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                    params[p.name] = p
    return params


def build(name: str, **kwargs: Any) -> DeltaStrategy:  # kwargs: scenario values
    """Instantiate a strategy; unknown or invalid parameters raise StrategyError."""
    cls = resolve(name)
    allowed = parameters(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise StrategyError(f"strategy.params: {unknown} not accepted by {name!r}; allowed: {sorted(allowed)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise StrategyError(f"strategy {name!r}: {err}") from None


def describe() -> list[tuple[str, str, str]]:
    """(name, one-line summary, paper) for every registered strategy."""
    rows = []
    for name, cls in available().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append((name, doc[0] if doc else "", getattr(cls, "paper", "")))
    return rows
