"""Units and currencies of numbers ("100 km", "$5", "5 million euros", "52%", "every 4 hours"):
reading a unit next to a number, and comparing quantities in the same dimension within 2% once
converted. The rules: ``docs/verification.md``, "Agreement by meaning".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

CONVERSION_TOLERANCE = 0.02
"""Relative tolerance for values compared after converting between units."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One meaning of a unit: ``base = value * factor + offset`` in ``dimension``'s base unit."""

    dimension: str
    factor: float
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Quantity:
    """A number read from an answer, with its unit (canonical name, or None) and, for a number
    without a unit, the stem of the content word right after it (its context, or None)."""

    value: float
    unit: str | None = None
    context: str | None = None


# name | aliases ("_" is a space) | readings "dimension:factor[:offset]" (numbers or fractions)
_TABLE = """
nm | nm nanometer nanometers nanometre nanometres | length:1e-9
mm | mm millimeter millimeters millimetre millimetres | length:0.001
cm | cm centimeter centimeters centimetre centimetres | length:0.01
m | m meter meters metre metres | length:1
km | km kms kilometer kilometers kilometre kilometres | length:1000
in | inch inches | length:0.0254
ft | ft foot feet | length:0.3048
yd | yd yds yard yards | length:0.9144
mi | mi mile miles | length:1609.344
nmi | nmi nautical_mile nautical_miles | length:1852
ly | light-year light-years light_year light_years | length:9.4607304725808e15
ug | µg μg mcg microgram micrograms | mass:1e-9
mg | mg milligram milligrams | mass:1e-6
g | g gram grams gramme grammes | mass:0.001
kg | kg kgs kilogram kilograms kilo kilos | mass:1
t | tonne tonnes metric_ton metric_tons | mass:1000
ton | ton tons | mass:1000 mass:907.18474 mass:1016.0469088
lb | lb lbs | mass:0.45359237
oz | oz ounce ounces | mass:0.028349523125
pound | pound pounds | mass:0.45359237 GBP:1
ml | ml milliliter milliliters millilitre millilitres | volume:0.001
l | l L liter liters litre litres | volume:1
gal | gal gallon gallons | volume:3.785411784 volume:4.54609
ns | ns nanosecond nanoseconds | time:1e-9
us | µs μs microsecond microseconds | time:1e-6
ms | ms msec millisecond milliseconds | time:0.001
s | sec secs second seconds | time:1
min | min mins minute minutes | time:60
h | h hr hrs hour hours | time:3600
day | day days | time:86400
week | wk wks week weeks | time:604800
month | month months | time:2629746
year | yr yrs year years | time:31556952
decade | decade decades | time:315569520
century | century centuries | time:3155695200
am | am a.m. | clock_am:1
pm | pm p.m. | clock_pm:1
bit | bit bits | data:0.125
byte | byte bytes | data:1
kb | kb kilobyte kilobytes | data:1e3 data:1024
mb | mb megabyte megabytes | data:1e6 data:1048576
gb | gb gigabyte gigabytes | data:1e9 data:1073741824
tb | tb terabyte terabytes | data:1e12 data:1099511627776
kib | kib kibibyte kibibytes | data:1024
mib | mib mebibyte mebibytes | data:1048576
gib | gib gibibyte gibibytes | data:1073741824
hz | hz hertz | frequency:1
khz | khz kilohertz | frequency:1e3
mhz | mhz megahertz | frequency:1e6
ghz | ghz gigahertz | frequency:1e9
C | °c degree_celsius degrees_celsius degrees_c celsius centigrade degrees_centigrade | temperature:1:273.15
F | °f degree_fahrenheit degrees_fahrenheit degrees_f fahrenheit | temperature:5/9:45967/180
K | kelvin kelvins degrees_kelvin | temperature:1
percent | % percent per_cent pct | percent:1
pp | percentage_point percentage_points | percentage_point:1
bp | basis_point basis_points | percentage_point:0.01
USD | $ us$ usd dollar dollars buck bucks | USD:1
AUD | a$ aud | AUD:1
CAD | c$ cad | CAD:1
cent | cent cents ¢ | USD:0.01 EUR:0.01
EUR | € eur euro euros | EUR:1
GBP | £ gbp sterling pounds_sterling | GBP:1
yen-yuan | ¥ | JPY:1 CNY:1
JPY | jpy yen | JPY:1
CNY | cny rmb yuan renminbi | CNY:1
INR | ₹ inr rupee rupees | INR:1
CHF | chf franc francs | CHF:1
BTC | btc bitcoin bitcoins | BTC:1
mi/h | mph | -
km/h | kph kmh | -
nmi/h | knot knots kn | -
"""

_READINGS: dict[str, tuple[Reading, ...]] = {}
_ALIASES: dict[str, str] = {}  # lowercase alias (single letters: as written) -> name
for _line in _TABLE.strip().splitlines():
    _unit, _aliases, _readings = (part.strip() for part in _line.split("|"))
    if _readings != "-":
        _READINGS[_unit] = tuple(
            Reading(d, float(Fraction(f)), float(Fraction(o[0])) if o else 0.0)
            for d, f, *o in (r.split(":") for r in _readings.split())
        )
    for _alias in _aliases.split():
        _ALIASES[_alias if len(_alias) == 1 else _alias.replace("_", " ").lower()] = _unit

PREFIX_CURRENCIES = {"$": "USD", "US$": "USD", "A$": "AUD", "C$": "CAD", "€": "EUR", "£": "GBP"}
PREFIX_CURRENCIES |= {"¥": "yen-yuan", "₹": "INR"}
"""Currency symbols read before a number ("$5", "US$5", "€2.1bn")."""

_PER_ONLY = {"s": "s"}  # "m/s": a unit only after "/" or "per"


def _pattern(alias: str) -> str:
    body = r"\s+".join(re.escape(part) for part in alias.split(" ")).replace("°", r"°\s*")
    if len(alias) == 1 and alias.isalpha():
        return body  # single letters ("m", "g", "h", "l", "L") only as written
    return f"(?i:{body})"


def _alternation(aliases: list[str]) -> str:
    return "|".join(_pattern(a) for a in sorted(aliases, key=len, reverse=True))


_UNIT = _alternation(list(_ALIASES))
_PER = _alternation(list(_ALIASES) + list(_PER_ONLY))
UNIT_AT = re.compile(
    rf"\s*(?:(?P<unit>{_UNIT})(?:\s*(?:/|\bper\s+|\ban?\s+)(?P<per>{_PER}))?"
    rf"|(?:/|\bper\s+)(?P<per_only>{_PER}))(?![^\W_])"
)
"""A unit right where a number ends (``match(text, end_of_number)``)."""

_UNIT_WORD = re.compile(rf"(?<![^\W_])(?:{_UNIT})(?![^\W_])")
_ATTACHED = re.compile(
    rf"(?<![^\W_])(\d+(?:[.,]\d+)*)({_alternation([a for a in _ALIASES if a[0].isalpha()])})(?![^\W_])"
)
_SCALE_ABBREVIATIONS = {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion"}
_CURRENCY_SCALE = re.compile(r"((?:US|A|C)?\$|[€£¥₹])\s?(\d+(?:[.,]\d+)*)\s?(bn|mn|[kKmMbB])(?![^\W_])")
_DIGIT = re.compile(r"\d")
_SCALE_ATTACHED = re.compile(r"(?<![^\W_])(\d+(?:[.,]\d+)*)\s?(bn|mn)(?![^\W_])")


def separate(text: str) -> str:
    """Write abbreviations out so that the tokenizer sees number and unit apart:
    "$5m" -> "$5 million", "2bn" -> "2 billion", "100km" -> "100 km"."""
    if _DIGIT.search(text) is None:
        return text
    text = _CURRENCY_SCALE.sub(lambda m: f"{m[1]}{m[2]} {_SCALE_ABBREVIATIONS[m[3].lower()]}", text)
    text = _SCALE_ATTACHED.sub(lambda m: f"{m[1]} {_SCALE_ABBREVIATIONS[m[2]]}", text)
    return _ATTACHED.sub(r"\1 \2", text)


def _name(alias: str) -> str:
    alias = re.sub(r"°\s*", "°", alias)
    return _ALIASES.get(alias) or _ALIASES.get(" ".join(alias.lower().split())) or _PER_ONLY[alias]


def unit_at(text: str, end: int, prefix: str | None) -> tuple[str | None, int]:
    """The unit of the number ending at ``end`` (with ``prefix``, a currency read before it)
    and where the unit ends; ``(prefix, end)`` when no unit follows."""
    m = UNIT_AT.match(text, end)
    if m is None:
        return prefix, end
    if m.group("unit") is not None:
        unit = _name(m.group("unit"))
        per = m.group("per")
        return (unit if per is None else f"{unit}/{_name(per)}"), m.end()
    return f"{prefix or ''}/{_name(m.group('per_only'))}", m.end()


@lru_cache(maxsize=256)  # the question of every pair of a cross-check
def units_named(text: str) -> frozenset[str]:
    """The units a text names anywhere (a question's "How many miles ...")."""
    return frozenset(_name(m.group()) for m in _UNIT_WORD.finditer(text))


@lru_cache(maxsize=1024)
def readings(unit: str) -> tuple[Reading, ...]:
    """The readings of a unit name, compound ones ("km/h", "USD/h", "/day") included."""
    if "/" not in unit:
        return _READINGS.get(unit, ())
    top, _, bottom = unit.partition("/")
    tops = readings(top) if top else (Reading("", 1.0),)
    return tuple(
        Reading(f"{t.dimension}/{b.dimension}", t.factor / b.factor) for t in tops for b in readings(bottom)
    )


def same_number(x: float, y: float) -> bool:
    """Equal values: exactly for integers below 100 000, within 0.5% otherwise."""
    if x == y:
        return True
    integral = x.is_integer() and y.is_integer() and max(abs(x), abs(y)) < 100_000
    return not integral and abs(x - y) <= 0.005 * max(abs(x), abs(y))


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= CONVERSION_TOLERANCE * max(abs(x), abs(y))


def same_unit(a: str, b: str) -> bool:
    """Whether two unit names mean the same unit (same name, or an identical reading:
    "pound" and "lb", "pound" and "£")."""
    return a == b or bool(set(readings(a)) & set(readings(b)))


def same_quantity(x: Quantity, y: Quantity) -> bool:
    """Whether two quantities are the same (``docs/verification.md``). A number without a
    unit matches the same number with any unit: it says nothing against it."""
    if x.unit is None or y.unit is None or same_unit(x.unit, y.unit):
        return same_number(x.value, y.value)
    for rx in readings(x.unit):
        for ry in readings(y.unit):
            if rx.dimension != ry.dimension:
                continue
            base_x, base_y = x.value * rx.factor + rx.offset, y.value * ry.factor + ry.offset
            # compare in each side's own unit, so that an offset (°C, °F) does not shrink the error
            if _close(x.value, (base_y - rx.offset) / rx.factor) or _close(
                (base_x - ry.offset) / ry.factor, y.value
            ):
                return True
    return False


def literal(x: Quantity, y: Quantity) -> bool:
    """Same value and no unit against it, without any conversion (a number of the question
    that an answer repeats: "How many miles is 100 km?" / "100 km is 62 miles")."""
    units_agree = x.unit is None or y.unit is None or same_unit(x.unit, y.unit)
    return units_agree and same_number(x.value, y.value)


def describe(q: Quantity) -> str:
    """``"100 km"``, ``"5,000,000 USD"``, ``"42"``, ``"2.5"``."""
    value = f"{int(q.value):,}" if q.value.is_integer() and abs(q.value) < 1e15 else f"{q.value:g}"
    return f"{value} {q.unit}" if q.unit else value
