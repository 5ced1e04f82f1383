"""One chart value as written by the model → a number plus what it said about it (pipelines/chart.py uses it).

`parse_quantity("~$1.2M")` → value 1200000.0, unit "$", qualifier "approximately". Accepted: a qualifier
before (~, ≈, about, approx., over, under, <, >, ...), a sign or accounting parentheses, a currency sign or
code, a number with thousands separators, a magnitude (k, M, B, bn, thousand, million, billion, trillion),
then %, a short unit ("kg", "people", "°C") and a qualifier after ("(estimated)", "(est.)", "*").
Anything else, or a value that is not finite, gives value None. Never raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_QUALIFIERS = {
    "~": "approximately", "≈": "approximately", "about": "approximately", "around": "approximately",
    "approx.": "approximately", "approx": "approximately", "approximately": "approximately",
    "roughly": "approximately", "ca.": "approximately", "circa": "approximately",
    "nearly": "nearly", "almost": "nearly",
    "over": "more than", "more than": "more than", "above": "more than", ">": "more than",
    "under": "less than", "less than": "less than", "below": "less than", "<": "less than",
    "at least": "at least", "≥": "at least", ">=": "at least", "at most": "at most", "≤": "at most", "<=": "at most",
    "est.": "estimated", "est": "estimated", "estimated": "estimated", "e": "estimated", "*": "estimated",
    "projected": "projected", "forecast": "projected", "expected": "projected", "preliminary": "preliminary",
}
_CURRENCY = {"$": "$", "us$": "$", "usd": "USD", "€": "€", "eur": "EUR", "£": "£", "gbp": "GBP", "¥": "¥",
             "jpy": "JPY", "cny": "CNY", "rmb": "CNY", "₹": "₹", "inr": "INR", "₩": "₩", "chf": "CHF"}
_MAGNITUDE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "mn": 1e6, "mm": 1e6, "million": 1e6, "millions": 1e6,
              "b": 1e9, "bn": 1e9, "billion": 1e9, "billions": 1e9, "t": 1e12, "tn": 1e12, "trillion": 1e12}

_PRE = "|".join(sorted((re.escape(q) for q in _QUALIFIERS if q not in ("e", "*", "est")), key=len, reverse=True))
_CUR = "|".join(sorted((re.escape(c) for c in _CURRENCY), key=len, reverse=True))
_QUANTITY = re.compile(
    rf"^(?P<pre>(?:{_PRE})(?=[\s\d$€£¥₹₩(+\-−.])\s*)?"
    r"(?P<open>\()?(?P<sign>[-+−])?\s*"
    rf"(?P<cur>(?:{_CUR})(?![a-z]))?\s*(?P<sign2>[-+−])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<close>\))?"
    r"(?:\s*(?P<mag>thousand|millions?|billions?|trillion|bn|mn|mm|tn|[kKmMbBtT])(?![A-Za-z]))?"
    r"(?P<pct>\s*%)?"
    rf"(?:\s*(?P<cur2>{_CUR})(?![a-z]))?"
    r"(?P<unit>\s*(?:°[CFK]?|[^\W\d_][^\W\d]*(?:/[^\W\d_]+)?)(?:\s+[^\W\d_][^\W\d]*)?)?"
    r"\s*(?P<post>\((?:est\.?|estimated|e|approx\.?|approximately|projected|forecast|preliminary|expected)\)|\*)?"
    r"\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Quantity:
    """A chart value: the number (magnitude applied, None when unreadable), its unit ("$", "%", "kg", or None),
    a qualifier ("approximately", "estimated", "more than", ... or None) and the text as written."""

    value: float | None
    unit: str | None
    qualifier: str | None
    text: str


def parse_quantity(cell: str) -> Quantity:
    text = " ".join(str(cell).split())
    m = _QUANTITY.match(text.replace("−", "-"))
    if m is None or not text:
        return Quantity(None, None, None, text)
    number = float(m["num"].replace(",", ""))
    mag = (m["mag"] or "").lower()
    currency = m["cur"] or m["cur2"]
    if mag in ("m", "t") and m["mag"] in ("m", "t") and not currency:
        # a bare lower-case m or t after a number is metres or tonnes, not million or trillion
        unit_text = m["mag"] + (m["unit"] or "")
        mag = ""
    else:
        unit_text = m["unit"] or ""
    number *= _MAGNITUDE.get(mag, 1.0)
    negative = (m["open"] is not None and m["close"] is not None) or "-" in (m["sign"] or "", m["sign2"] or "")
    if (m["open"] is None) != (m["close"] is None) or not math.isfinite(number):
        return Quantity(None, None, None, text)
    unit_words = unit_text.strip()
    words = unit_words.lower().split()
    qualifier = None
    if words and words[-1] in ("estimated", "projected", "forecast", "preliminary", "expected"):
        qualifier = _QUALIFIERS[words[-1]]
        unit_words = " ".join(unit_words.split()[:-1])
    units = [u for u in (_CURRENCY.get(currency.lower()) if currency else None, "%" if m["pct"] else None,
                         unit_words or None) if u]
    pre = (m["pre"] or "").strip().lower()
    post = (m["post"] or "").strip("()").lower().rstrip(".")
    qualifier = _QUALIFIERS.get(pre) or _QUALIFIERS.get(post) or _QUALIFIERS.get(post + ".") or qualifier
    return Quantity(-number if negative else number, " ".join(units) or None, qualifier, text)


def parse_number(cell: str) -> float | None:
    """'1,234.5' → 1234.5, '12%' → 12.0, '(3)' → -3.0, '−2' → -2.0, '$1.2M' → 1200000.0; None when not a number."""
    return parse_quantity(cell).value
