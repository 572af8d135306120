"""Faster construction of frozen slotted dataclasses on the hot path.

A frozen dataclass's generated ``__init__`` stores each field with
``object.__setattr__(self, name, value)`` (its own ``__setattr__`` refuses): a lookup
and a generic attribute store per field, about 7x a plain class's ``self.x = x``.
The guard makes several such objects per model call (the call, its admission, the
reservation, the usage, the record), so :func:`fast_init` gives a class an ``__init__``
that stores each field through its slot's descriptor instead: the same parameters,
defaults, default factories and ``__post_init__``; everything else (frozen
assignment, equality, hashing, ``repr``, ``dataclasses.replace``, pickling) is the
dataclass's own.

A descriptor's ``__set__`` is still a call through a method wrapper per field; a plain
``self.x = x`` on a slotted class is one specialised instruction. So an instance of the
class itself (not of a subclass) is filled in as an instance of a plain twin with the
same slots (its ``__class__`` set to the twin, then back: the layouts are the same, as
Python checks), about a third of the cost for a record's 27 fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["fast_init", "fields_maker"]

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Decorate a ``@dataclass(frozen=True, slots=True)`` class (above the dataclass
    decorator)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init is for frozen slotted dataclasses")
    twin = _twin(cls)
    namespace: dict[str, Any] = {"_MISSING": dataclasses.MISSING, "_cls": cls, "_twin": twin,
                                 "_set_class": _SET_CLASS}
    args: list[str] = []
    body: list[str] = []  # through the slots' descriptors
    plain: list[str] = []  # as the twin's plain stores
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.kw_only or isinstance(f.type, dataclasses.InitVar):
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init takes plain fields only")
        setter = f"_set_{f.name}"
        namespace[setter] = cls.__dict__[f.name].__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
            value = f.name
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_MISSING")
            value = f"_factory_{f.name}() if {f.name} is _MISSING else {f.name}"
        else:
            args.append(f.name)
            value = f.name
        body.append(f"{setter}(self, {value})")
        plain.append(f"self.{f.name} = {value}")
    lines = body or ["pass"]
    if twin is not None and plain:
        lines = ["if type(self) is _cls:", "    _set_class(self, _twin)", "    try:",
                 *(f"        {line}" for line in plain),
                 "    finally:", "        _set_class(self, _cls)", "else:",
                 *(f"    {line}" for line in body)]
    if hasattr(cls, "__post_init__"):
        lines.append("self.__post_init__()")
    source = "def __init__(self, {}):\n    {}\n".format(", ".join(args),
                                                     "\n    ".join(lines))
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__  # type: ignore[misc]
    cls.__init__ = init  # type: ignore[method-assign]
    # fields_maker(cls): made as the twin and turned into ``cls`` once (no try/finally:
    # an object that fails half-filled is dropped), without __post_init__
    make = ["self = _twin()", *plain, "_set_class(self, _cls)"] if twin is not None \
        else ["self = _new(_cls)", *body]
    namespace["_new"] = object.__new__
    exec("def make({}):\n    {}\n    return self\n".format(", ".join(args),
                                                           "\n    ".join(make)), namespace)
    namespace["make"].__qualname__ = f"fields_maker({cls.__qualname__})"
    _MAKERS[cls] = namespace["make"]
    return cls


def fields_maker(cls: type[T]) -> Callable[..., T]:
    """A function that builds a ``cls`` (decorated with :func:`fast_init`) from its
    fields, as its ``__init__`` does (same parameters and defaults) but without its
    ``__post_init__`` (for a caller whose values are valid by construction) and about a
    quarter cheaper: the object is made as the plain twin and turned into a ``cls``
    once, where ``__init__`` receives a ``cls`` and turns it twice."""
    return _MAKERS[cls]


_MAKERS: dict[type, Callable[..., Any]] = {}


_SET_CLASS = object.__dict__["__class__"].__set__


def _twin(cls: type) -> type | None:
    """A plain class with ``cls``'s slots whose instances can become ``cls`` instances
    by ``__class__`` assignment, or None when Python refuses it (``cls`` derives from
    another class, or its layout differs)."""
    if cls.__bases__ != (object,):
        return None
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": cls.__dict__["__slots__"]})
    try:
        probe: Any = object.__new__(cls)
        _SET_CLASS(probe, twin)
        _SET_CLASS(probe, cls)
    except TypeError:
        return None
    return twin
