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
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Decorate a ``@dataclass(frozen=True, slots=True)`` class (above the dataclass
    decorator)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init is for frozen slotted dataclasses")
    namespace: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    args: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.kw_only or isinstance(f.type, dataclasses.InitVar):
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init takes plain fields only")
        setter = f"_set_{f.name}"
        namespace[setter] = cls.__dict__[f.name].__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
            body.append(f"{setter}(self, {f.name})")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_MISSING")
            body.append(f"{setter}(self, _factory_{f.name}() if {f.name} is _MISSING "
                        f"else {f.name})")
        else:
            args.append(f.name)
            body.append(f"{setter}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = "def __init__(self, {}):\n    {}\n".format(", ".join(args),
                                                     "\n    ".join(body or ["pass"]))
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__  # type: ignore[misc]
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
