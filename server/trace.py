"""Triton's trace extension, as far as this server goes: tracing is not implemented, so the settings
say `trace_level: OFF` and stay that way. Reading them (tritonclient's `get_trace_settings`, an
`update_trace_settings` that changes nothing) works, so clients and QA suites that only look keep
working; asking for any other value is refused by name (UNIMPLEMENTED / 501), never accepted and
ignored. Transport-free: both frontends convert."""

from __future__ import annotations

from server.errors import InvalidArgument, Unimplemented, clip

# Triton's keys and their values when tracing is off (its defaults: rate 1000, count -1 = no limit)
SETTINGS: dict[str, list[str]] = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}


def trace_setting(updates: dict[str, list[str] | None]) -> dict[str, list[str]]:
    """The trace settings after `updates` ({key: values}; None or [] = back to the default, which is
    what they are): every key must be Triton's, every value the one it has."""
    for key, values in updates.items():
        if key not in SETTINGS:
            raise InvalidArgument(f"trace setting {clip(key)} is unknown; known: {', '.join(SETTINGS)}")
        if not values:
            continue
        if key == "trace_level":
            values = [v.upper() for v in values]
        if list(values) != SETTINGS[key]:
            raise Unimplemented(
                f"trace setting {clip(key)} = {clip(list(values))}: tracing is not implemented by this server; "
                f"{key} stays {SETTINGS[key]}"
            )
    return {k: list(v) for k, v in SETTINGS.items()}


def rest_form(settings: dict[str, list[str]]) -> dict[str, object]:
    """Triton's HTTP shape: trace_level a list, the other settings one string each."""
    return {k: (v if k == "trace_level" else (v[0] if v else "")) for k, v in settings.items()}


def from_json(body: object) -> dict[str, list[str] | None]:
    """A REST update body ({key: value | [values] | null}) as {key: values}."""
    if not isinstance(body, dict):
        raise InvalidArgument("trace setting request body must be a JSON object")
    out: dict[str, list[str] | None] = {}
    for key, value in body.items():
        if value is None:
            out[key] = None
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = value
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            out[key] = [str(value)]
        else:
            raise InvalidArgument(f"trace setting {clip(key)}: expected a string or a list of strings")
    return out
