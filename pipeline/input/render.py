"""Typed values (JSONL, Parquet) as the text a CSV cell would hold: one rule per type, so ids and texts agree.

The rules (docs/inputs.md): null → "", bool → "true"/"false", int → "42", a float that is a whole number
below 1e16 → "42" (a pandas integer column with a null becomes float64), any other float → its shortest
round-trip form ("0.1", "1e+20", "nan"), dates and times → ISO 8601, bytes → UTF-8 text, lists, structs and
maps → compact JSON.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson

_WHOLE_LIMIT = 1e16  # past this a float no longer holds every integer, so "1e+16" says more than digits


def render(value: Any) -> str:
    """The text of one typed cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return render_float(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        # surrogateescape: undecodable bytes mark the row as bad, as they do in a CSV.
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list | tuple | dict):
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    return str(value)  # Decimal, timedelta and anything else with a natural text form


def render_float(value: float) -> str:
    """Whole numbers without ".0", everything else in its shortest round-trip form."""
    if value.is_integer() and abs(value) < _WHOLE_LIMIT:
        return str(int(value))
    return repr(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dt.timedelta):
        return str(value)
    raise TypeError(f"cannot render {type(value).__name__} as JSON")
