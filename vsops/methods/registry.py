"""Selection methods by name."""
from __future__ import annotations

from vsops.methods.base import SelectionMethod

__all__ = ["register_method", "method_class", "make_method", "available"]

_METHODS: dict[str, type[SelectionMethod]] = {}
DEFAULT = "visionselector"


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Class decorator: registers a :class:`SelectionMethod` under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)) or not cls.name:
        raise TypeError(f"register_method takes a SelectionMethod subclass with a name, got {cls!r}")
    _METHODS[cls.name] = cls
    return cls


STAGES = ("vision", "language")


def available(stage: str | None = None) -> list[str]:
    """The registered method names, the learned scorer (``"visionselector"``) first: all, or
    those of one ``stage`` (``"vision"``: they select the visual tokens before the language
    model; ``"language"``: they drop them inside it)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    names = [name for name, cls in _METHODS.items() if stage is None or cls.stage == stage]
    return sorted(names, key=lambda name: (name != DEFAULT, name))


def method_class(name: str) -> type[SelectionMethod]:
    """The registered class of ``name``; ValueError naming the choices otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str) or a SelectionMethod, got {type(name).__name__}")
    cls = _METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown selection method {name!r}; registered: {available()}")
    return cls


def make_method(method, **kwargs) -> SelectionMethod:
    """A method instance from a name (built with ``kwargs``) or an instance (returned as is)."""
    if isinstance(method, SelectionMethod):
        return method
    return method_class(method)(**kwargs)
