"""What every dialect's wire models share: strict request parsing and validation errors as `param` paths."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from appliance.engine.types import EngineError, Error


class RequestModel(BaseModel):
    """Unknown fields are ignored (clients send many optional fields); known ones are checked strictly,
    as the OpenAPI document types them: "2" is not an integer, 0 is not a boolean."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ResponseModel(BaseModel):
    """A response or chunk: built by the server, so no validation cost worth speaking of."""

    model_config = ConfigDict(extra="forbid")


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request, on both APIs
# Stop strings, on both APIs alike: at most MAX_STOPS per request (OpenAI documents 4, Ollama none; 16 admits
# the lists that clients build from model templates) of at most MAX_STOP_CHARS each.
MAX_STOPS = 16
MAX_STOP_CHARS = 256  # per stop string, on both APIs: the worker scans every stop string at every token
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOPS)]
# One string or a list; tried in that order, so a bad value's error always names `stop` (pydantic's default
# "smart" union reported either branch's error first, and so named `stop` or `stop[0]` from run to run).
Stops = Annotated[StopString | StopList | None, Field(union_mode="left_to_right")]


class OmitNone(ResponseModel):
    """Serialized without its None fields: a delta carries only what changed, a final line only its facts."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


def client_error(status: int, message: str, code: str | None = None, param: str | None = None) -> EngineError:
    """A 4xx for the client's mistake, rendered in the caller's dialect by api/errors.py."""
    return EngineError(Error(status, message, "invalid_request_error", code, param))


def param_path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (OpenAI's way of naming a param)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_LABELS = ("function-", "json-or-python", "constrained-")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch and validator labels ('str', 'list[str]', 'function-after[...]')."""
    return tuple(
        p
        for p in loc
        if isinstance(p, int) or not (p.startswith(_LABELS) or "[" in p or p in ("str", "int", "list", "dict"))
    )


def from_validation(e: ValidationError) -> EngineError:
    err = e.errors()[0]
    kind = err["type"]
    if kind == "json_invalid":
        return client_error(400, f"The request body is not valid JSON: {err['msg']}.", "invalid_json")
    if kind in ("model_type", "model_attributes_type") and not err["loc"]:
        return client_error(400, "The request body must be a JSON object.", "invalid_json")
    param = param_path(_clean_loc(tuple(err["loc"]))) or None
    if kind == "missing":
        return client_error(400, f"Missing required parameter: '{param}'.", None, param)
    if kind == "extra_forbidden":
        return client_error(400, f"Unrecognized request argument supplied: {param}", "invalid_value", param)
    return client_error(400, f"Invalid value for '{param}': {err['msg']}.", "invalid_value", param)


def parse(model: type[Any], body: bytes) -> Any:
    """Validate a raw JSON body against `model`; a 400 naming the `param` on any problem.

    pydantic's JSON parser bounds nesting depth and number size, so a deeply nested document or a
    5,000-digit integer is a 400, never a 500.
    """
    if not body.strip():
        raise client_error(400, "The request body is empty; expected a JSON object.", "invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e) from None
    except (ValueError, RecursionError) as e:  # defensive: the parser itself refused the document
        raise client_error(400, f"The request body is not valid JSON: {e}.", "invalid_json") from None


def embedding_inputs(raw: Any) -> list[str]:
    """The strings of an embeddings `input` (one or a list), bounded and non-empty, on both APIs."""
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        items = raw
    elif isinstance(raw, list) and raw and all(isinstance(x, int | list) for x in raw):
        raise client_error(400, "Token arrays are not supported as 'input'; send strings.", "invalid_value", "input")
    else:
        raise client_error(
            400, "Invalid value for 'input': expected a string or a list of strings.", "invalid_value", "input"
        )
    if not items:
        raise client_error(400, "'input' must not be empty.", "invalid_value", "input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise client_error(400, f"'input' may hold at most {MAX_EMBEDDING_INPUTS} strings.", "invalid_value", "input")
    for i, s in enumerate(items):
        if not s.strip():
            param = "input" if isinstance(raw, str) else f"input[{i}]"
            raise client_error(400, f"'{param}' must not be empty.", "invalid_value", param)
    return items
