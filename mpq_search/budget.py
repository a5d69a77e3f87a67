"""The budget language: the text a user writes after `--budget`, parsed without a model.

Budget strings (clauses joined by commas, case-insensitive)::

    4.5bits          average executed weight bits <= 4.5; activations at most 8 unless given
    stored<=4.5bits  average stored weight bits <= 4.5 (every distinct copy; no activation limit)
    w4.5a6           average executed weight bits <= 4.5 and average activation bits <= 6
    a6               average activation bits <= 6
    bops<=W4A8       BOPs at most those of uniform W4A8
    bops<=1.2G       BOPs (per denoiser call, per sample) at most 1.2e9; units K, M, G, T
    size<=1.5MB      weight memory at most 1.5e6 bytes; units B, KB, MB, GB (1000-based), KiB, MiB

Clauses may combine, e.g. ``4.5bits,stored<=6bits``: 4.5 executed bits with at most 6 stored.

``str(budget)`` prints the canonical form, which parses back to an equal Budget;
``canonical_budget(text)`` gives the same form without layer specs (a budget's identity).

Parsing needs no layer specs (and no torch), so the study config checks a budget and keeps its
canonical text as the study's identity; `cost.parse_budget` resolves a parsed budget (a relative
BOPs limit such as W4A8) against a model's layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TypeVar

from mpq_search.bitmap import LayerBits
from mpq_search.errors import BitMapError, BudgetError

BOPS_UNITS: dict[str, float] = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
SIZE_UNITS: dict[str, float] = {
    "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30,
}
_UNIT_CASE = {"k": "K", "m": "M", "g": "G", "t": "T", "b": "B", "kb": "KB", "mb": "MB", "gb": "GB",
              "kib": "KiB", "mib": "MiB", "gib": "GiB", "": ""}


def check_limit(name: str, value: float | None) -> None:
    """A budget limit is a positive finite number, or None (unlimited)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise BudgetError(f"budget limit {name} must be a positive number, got {value}")


def canonical_text(
    w_bits: float | None, a_bits: float | None, stored_w_bits: float | None,
    bops_text: str | None, size_text: str | None,
) -> str:
    """The canonical budget text (`str(Budget)` and `canonical_budget`)."""
    parts = []
    if w_bits is not None and a_bits is not None:
        parts.append(f"w{format_number(w_bits)}a{format_number(a_bits)}")
    elif w_bits is not None:
        parts.append(f"{format_number(w_bits)}bits")
    elif a_bits is not None:
        parts.append(f"a{format_number(a_bits)}")
    if stored_w_bits is not None:
        parts.append(f"stored<={format_number(stored_w_bits)}bits")
    if bops_text is not None:
        parts.append(f"bops<={bops_text}")
    if size_text is not None:
        parts.append(f"size<={size_text}")
    return ",".join(parts)


_NUM = r"(\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_BITS = re.compile(rf"(?P<w>{_NUM})bits")
_WA = re.compile(rf"w(?P<w>{_NUM})(?:a(?P<a>{_NUM}))?")
_A = re.compile(rf"a(?P<a>{_NUM})")
_BOPS_REF = re.compile(r"bops<=(?P<ref>w\d+a\d+)")
_BOPS_ABS = re.compile(rf"bops<=(?P<v>{_NUM})(?P<u>[kmgt]?)")
_SIZE = re.compile(rf"size<=(?P<v>{_NUM})(?P<u>[kmg]?i?b)")
_STORED = re.compile(rf"stored<=(?P<w>{_NUM})bits")

BUDGET_FORMS = "4.5bits, w4.5a6, a6, bops<=W4A8, bops<=1.2G, size<=1.5MB, stored<=4.5bits"


def format_number(value: float) -> str:
    """Shortest text that parses back to exactly `value` (no trailing '.0')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _positive(text: str, clause: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise BudgetError(f"budget clause {clause!r}: the limit must be positive")
    return value


@dataclass(frozen=True)
class ParsedBudget:
    """Budget text parsed but not resolved: a relative BOPs limit ("W4A8") is still a setting.

    Parsing needs no layer specs, so `canonical_budget` can check and print a budget without a
    model; `cost.parse_budget` turns it into a Budget once the specs are known.
    """

    w_bits: float | None = None
    a_bits: float | None = None
    bops: float | LayerBits | None = None
    bops_text: str | None = None
    weight_bytes: float | None = None
    size_text: str | None = None
    stored_w_bits: float | None = None

    def __post_init__(self) -> None:
        bops = None if isinstance(self.bops, LayerBits) else self.bops
        for name, value in (("w_bits", self.w_bits), ("a_bits", self.a_bits), ("bops", bops),
                            ("weight_bytes", self.weight_bytes),
                            ("stored_w_bits", self.stored_w_bits)):
            check_limit(name, value)  # as Budget does, so canonical_budget refuses the same

    @property
    def limited(self) -> list[str]:
        """Names of the Budget limits this text sets."""
        pairs = {"w_bits": self.w_bits, "a_bits": self.a_bits, "bops": self.bops,
                 "weight_bytes": self.weight_bytes, "stored_w_bits": self.stored_w_bits}
        return [k for k, v in pairs.items() if v is not None]

    def merged(self, other: ParsedBudget) -> ParsedBudget:
        """Both sets of limits (the caller has checked that they do not overlap)."""
        return ParsedBudget(
            w_bits=_first(self.w_bits, other.w_bits), a_bits=_first(self.a_bits, other.a_bits),
            bops=self.bops if self.bops is not None else other.bops,  # _first joins to object
            bops_text=_first(self.bops_text, other.bops_text),
            weight_bytes=_first(self.weight_bytes, other.weight_bytes),
            size_text=_first(self.size_text, other.size_text),
            stored_w_bits=_first(self.stored_w_bits, other.stored_w_bits),
        )

    def __str__(self) -> str:
        return canonical_text(self.w_bits, self.a_bits, self.stored_w_bits, self.bops_text,
                          self.size_text)


_T = TypeVar("_T")


def _first(a: _T | None, b: _T | None) -> _T | None:
    return a if a is not None else b


def _parse_clause(clause: str) -> ParsedBudget:
    """One clause -> the limits it sets; needs no layer specs."""
    if m := _BITS.fullmatch(clause):
        return ParsedBudget(w_bits=_positive(m["w"], clause))
    if m := _WA.fullmatch(clause):
        a_bits = None if m["a"] is None else _positive(m["a"], clause)
        return ParsedBudget(w_bits=_positive(m["w"], clause), a_bits=a_bits)
    if m := _A.fullmatch(clause):
        return ParsedBudget(a_bits=_positive(m["a"], clause))
    if m := _BOPS_REF.fullmatch(clause):
        try:
            bits = LayerBits.parse(m["ref"])
        except BitMapError as e:
            raise BudgetError(f"budget clause {clause!r}: {e}") from e
        return ParsedBudget(bops=bits, bops_text=str(bits))
    if m := _BOPS_ABS.fullmatch(clause):
        value = _positive(m["v"], clause)
        return ParsedBudget(bops=value * BOPS_UNITS[m["u"]],
                             bops_text=format_number(value) + _UNIT_CASE[m["u"]])
    if m := _STORED.fullmatch(clause):
        return ParsedBudget(stored_w_bits=_positive(m["w"], clause))
    if clause.startswith("stored<="):
        raise BudgetError(f"budget clause {clause!r}: write a stored-bits limit as "
                          "stored<=4.5bits (average stored weight bits)")
    if m := _SIZE.fullmatch(clause):
        if m["u"] not in SIZE_UNITS:
            raise BudgetError(f"budget clause {clause!r}: unknown size unit; use "
                              "B, KB, MB, GB, KiB, MiB or GiB")
        value = _positive(m["v"], clause)
        return ParsedBudget(weight_bytes=value * SIZE_UNITS[m["u"]],
                             size_text=format_number(value) + _UNIT_CASE[m["u"]])
    raise BudgetError(f"cannot parse budget clause {clause!r}; supported forms: {BUDGET_FORMS}")


def parse_text(text: str) -> ParsedBudget:
    """Budget text -> its limits, every syntax error raised; relative BOPs left unresolved."""
    clauses = [c.strip().lower().replace(" ", "") for c in text.split(",")]
    if not text.strip() or any(not c for c in clauses):
        raise BudgetError(f"empty budget or empty clause in {text!r}; supported forms: "
                          f"{BUDGET_FORMS}")
    parsed = ParsedBudget()
    for clause in clauses:
        new = _parse_clause(clause)
        twice = sorted(k for k in new.limited if k in parsed.limited)
        if twice:
            raise BudgetError(f"budget {text!r} limits {twice[0]} twice")
        parsed = parsed.merged(new)
    return parsed


def canonical_budget(text: str) -> str:
    """The canonical form of a budget text, e.g. "4.50bits" -> "4.5bits", "W4.5A6" -> "w4.5a6".

    Equal to `str(parse_budget(text, specs))` for any specs, but needs none (a relative limit
    stays relative: "bops<=w4a8" -> "bops<=W4A8"), so it can serve as a budget's identity, e.g.
    of a study. Malformed text raises BudgetError exactly as `parse_budget` does.
    """
    return str(parse_text(text))
