"""Injection operators by name: a small dict filled by a decorator, read by configs and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .operator import InjectionOperator

OPERATORS: dict[str, type[InjectionOperator]] = {}


def register_operator(name: str):
    def wrap(cls):
        if name in OPERATORS:
            raise ValueError(f"injection operator {name!r} is registered twice")
        cls.name = name
        OPERATORS[name] = cls
        return cls

    return wrap


def get_operator(name: str) -> type[InjectionOperator]:
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown injection operator {name!r}; choose one of {sorted(OPERATORS)}") from None
