"""Type checks of values that a user's file puts into a record's fields.

A study TOML, or the quantizer a bit-map file records, may hold any value where a field wants
an integer. Checking each value's type once, where the file is read, gives the record's own
one-line error; without it a list or a string fails later as a TypeError deep inside (found by
fuzzing the parsers, issue 30: `tests/test_fuzz.py`).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mpq_search.errors import MPQSearchError

_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: resolving them parses strings)."""
    return get_type_hints(cls)


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` has the type that `hint` names.

    A Literal needs only the type of its values: the record checks the value itself against
    its supported list, with a message that lists them. A float field takes an int (TOML's `2`
    for 2.0); a bool is no int, though Python says it is.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, h) for h in args)
    if origin is Literal:
        return isinstance(value, tuple(type(a) for a in args))
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(conforms, value, args))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, int | hint) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any, *, plural: bool = False) -> str:
    """What `hint` asks for, in words: "an integer", "a list of strings" (None is left out: a
    file cannot write it)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(h, plural=plural) for h in args if h is not type(None))
    if origin is Literal:
        hint = type(args[0])
    if origin is tuple:
        return ("lists" if plural else "a list") + " of " + describe(args[0], plural=True)
    names = _NAMES.get(hint, (f"a {getattr(hint, '__name__', hint)}",) * 2)
    return names[plural]


def check_types(cls: type, values: Mapping[str, Any], error: type[MPQSearchError],
                prefix: str = "") -> None:
    """Raise `error` naming the first of `values` whose type is not its field's in `cls`
    (names that are no field of `cls` are left to the caller)."""
    hints = field_types(cls)
    for name, value in values.items():
        if name in hints and not conforms(value, hints[name]):
            raise error(f"{prefix}{name} must be {describe(hints[name])}, got {value!r}")
