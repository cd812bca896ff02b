"""Plain record classes: keyword fields declared by annotations, without importing ``dataclasses``.

``dataclasses`` pulls in ``inspect`` (with ``ast``, ``dis`` and ``tokenize``), about 8 ms of a ~120 ms
conversion whose budget is a small multiple of ``cp`` (issue #8). A record declares its fields as annotations
with optional defaults (``Factory(list)`` for a fresh mutable default) and gets an ``__init__`` (fields by
keyword, or by position in declaration order),
``__repr__`` and ``__eq__``; classes built in their thousands (tensors, modules) write their own ``__init__``.
:func:`as_dataclass` turns a record class into a real dataclass when something needs one (pydantic does).

Example:
    >>> class Point(Record):
    ...     x: int
    ...     y: int = 0
    ...     tags: list[str] = Factory(list)
    >>> Point(x=1)
    Point(x=1, y=0, tags=[])
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Record", "Factory", "as_dataclass"]

_MISSING = object()


class Factory:
    """A default made fresh for every instance (like ``dataclasses.field(default_factory=...)``)."""

    __slots__ = ("make",)

    def __init__(self, make) -> None:
        self.make = make


class Record:
    """Base of the record classes; subclasses declare fields as annotations (``frozen=True`` to forbid changes)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}
    _factories: dict[str, Any] = {}
    _frozen: bool = False

    def __init_subclass__(cls, frozen: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = list(cls._fields)
        defaults = dict(cls._defaults)
        factories = dict(cls._factories)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if isinstance(annotation, str) and annotation.startswith(("ClassVar", "typing.ClassVar")):
                continue
            if name not in fields:
                fields.append(name)
            value = cls.__dict__.get(name, _MISSING)
            if isinstance(value, Factory):
                factories[name] = value.make
                defaults.pop(name, None)
                delattr(cls, name)
            elif value is not _MISSING:
                defaults[name] = value
                factories.pop(name, None)
        cls._fields = tuple(fields)
        cls._defaults = defaults
        cls._factories = factories
        if frozen is not None:
            cls._frozen = frozen
        if "__eq__" not in cls.__dict__ and "__hash__" not in cls.__dict__:
            # like dataclasses: equal-by-value records are hashable only when frozen
            cls.__hash__ = Record._value_hash if cls._frozen else None  # type: ignore[method-assign]
        if cls._frozen:
            cls.__setattr__ = Record._refuse_setattr  # type: ignore[method-assign]
            cls.__delattr__ = Record._refuse_delattr  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:  # positional arguments fill the fields in declaration order
            if len(args) > len(self._fields):
                msg = f"{type(self).__name__}() takes {len(self._fields)} positional arguments, got {len(args)}"
                raise TypeError(msg)
            for name, value in zip(self._fields, args):
                if name in kwargs:
                    msg = f"{type(self).__name__}() got multiple values for {name!r}"
                    raise TypeError(msg)
                kwargs[name] = value
        values = self.__dict__
        for name in self._fields:
            if name in kwargs:
                values[name] = kwargs.pop(name)
            elif name in self._defaults:
                values[name] = self._defaults[name]
            elif name in self._factories:
                values[name] = self._factories[name]()
            else:
                msg = f"{type(self).__name__}() missing keyword argument {name!r}"
                raise TypeError(msg)
        if kwargs:
            msg = f"{type(self).__name__}() got unexpected keyword argument(s) {', '.join(map(repr, kwargs))}"
            raise TypeError(msg)

    def _refuse_setattr(self, name: str, value: Any) -> None:
        msg = f"cannot assign to field {name!r}: {type(self).__name__} is immutable"
        raise AttributeError(msg)

    def _refuse_delattr(self, name: str) -> None:
        msg = f"cannot delete field {name!r}: {type(self).__name__} is immutable"
        raise AttributeError(msg)

    def __repr__(self) -> str:
        values = self.__dict__
        inner = ", ".join(f"{name}={values.get(name)!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        mine, theirs = self.__dict__, other.__dict__
        return all(mine.get(name) == theirs.get(name) for name in self._fields)

    def _value_hash(self) -> int:
        values = self.__dict__
        return hash((type(self).__name__, *(values.get(name) for name in self._fields)))

    def field_values(self) -> dict[str, Any]:
        """The fields as a dict (shallow)."""
        values = self.__dict__
        return {name: values.get(name) for name in self._fields}


def as_dataclass(cls: type[Record]) -> type[Record]:
    """Register `cls`'s fields as dataclass fields (in place), keeping its own methods; idempotent.

    Only ``__dataclass_fields__`` and friends are added: instances, ``__init__``, equality and repr stay the
    record's, so existing objects become dataclass instances too (what pydantic needs to validate, serialise
    and describe them).
    """
    import dataclasses

    if "__dataclass_fields__" in cls.__dict__:
        return cls
    for name, make in cls._factories.items():
        setattr(cls, name, dataclasses.field(default_factory=make))
    frozen = cls._frozen
    try:
        cls._frozen = False  # dataclass() itself sets class attributes
        dataclasses.dataclass(cls, init=False, repr=False, eq=False, kw_only=True)
    finally:
        cls._frozen = frozen
    return cls
