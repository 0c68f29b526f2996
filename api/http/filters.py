"""Wire filters -> the store's `Filter`, checked against the collection's indexed fields."""

from typing import Any

from twostage.retrieval.access.principals import ACL_FIELD
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.store.vector_store import AnyOf, Condition, Equals, FieldType, Filter, Range

_RANGE_OPS = {"gte", "gt", "lte", "lt"}


def parse_filter(spec: dict[str, Any] | None, indexed: dict[str, FieldType]) -> Filter | None:
    """`{"field": value | {"any": [...]} | {"gte": n, ...}}` (ANDed) as a `Filter`.

    Only indexed fields may be filtered on, so a filter never turns a query into a full scan
    and a typo in a field name is an error instead of silently matching nothing.
    """
    if not spec:
        return None
    conditions: list[Condition] = []
    for key, value in spec.items():
        if key == ACL_FIELD or key.startswith(ACL_FIELD + "."):
            raise InputError(
                f"cannot filter on {key!r}: who sees what comes from the API key, not the request"
            )
        if key not in indexed:
            raise InputError(
                f"cannot filter on {key!r}: not an indexed field (indexed: {', '.join(sorted(indexed))})"
            )
        conditions.append(_condition(key, value, indexed[key]))
    return Filter(must=tuple(conditions))


def _condition(key: str, value: Any, kind: FieldType) -> Condition:
    if isinstance(value, dict):
        if set(value) == {"any"}:
            values = value["any"]
            if not isinstance(values, list) or not values or not all(_scalar_ok(v, kind) for v in values):
                raise InputError(f"filter {key!r}: 'any' needs a non-empty list of {kind} values")
            return AnyOf(key, tuple(values))
        if value and set(value) <= _RANGE_OPS:
            if kind not in {"integer", "float"}:
                raise InputError(f"filter {key!r}: ranges need a numeric field, {key!r} is {kind}")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
                raise InputError(f"filter {key!r}: range bounds must be numbers")
            return Range(key, **{op: float(v) for op, v in value.items()})
        raise InputError(
            f"filter {key!r}: use a value, {{'any': [...]}} or {{'gte'|'gt'|'lte'|'lt': number}}"
        )
    if not _scalar_ok(value, kind):
        raise InputError(f"filter {key!r}: expected a {kind} value, got {type(value).__name__}")
    return Equals(key, value)


def _scalar_ok(value: Any, kind: FieldType) -> bool:
    if kind == "keyword":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)
