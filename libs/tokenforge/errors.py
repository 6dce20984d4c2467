"""The one table of error words (SPEC §4) and how they cross gRPC and HTTP.

Services raise `TFError`; the gRPC plumbing turns it into a status with an `ErrorDetail`
in the details and the word in trailing metadata; clients turn it back with `from_rpc_error`;
the edge turns it into an OpenAI-shaped JSON error.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# word → (HTTP status, gRPC status, OpenAI error type)
ERROR_TABLE: dict[str, tuple[int, grpc.StatusCode, str]] = {
    "invalid_request": (400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    "invalid_api_key": (401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"),
    "invalid_admin_token": (401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"),
    "insufficient_balance": (402, grpc.StatusCode.FAILED_PRECONDITION, "insufficient_quota"),
    "key_budget_exceeded": (402, grpc.StatusCode.FAILED_PRECONDITION, "insufficient_quota"),
    "run_budget_exceeded": (402, grpc.StatusCode.FAILED_PRECONDITION, "insufficient_quota"),
    "model_not_allowed": (403, grpc.StatusCode.PERMISSION_DENIED, "permission_error"),
    "route_not_allowed": (403, grpc.StatusCode.PERMISSION_DENIED, "permission_error"),
    "model_not_found": (404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    "not_found": (404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    "conflict": (409, grpc.StatusCode.ALREADY_EXISTS, "invalid_request_error"),
    "request_too_large": (413, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    "request_timeout": (408, grpc.StatusCode.DEADLINE_EXCEEDED, "invalid_request_error"),
    "upstream_error": (502, grpc.StatusCode.UNAVAILABLE, "api_error"),
    "upstream_timeout": (504, grpc.StatusCode.DEADLINE_EXCEEDED, "api_error"),
    "internal_error": (500, grpc.StatusCode.INTERNAL, "api_error"),
    "unavailable": (503, grpc.StatusCode.UNAVAILABLE, "api_error"),
}

# Trailing-metadata keys that carry the error across gRPC (also in the status details).
MD_CODE = "tf-error-code"
MD_PARAM = "tf-error-param"
MD_RECEIPT = "tf-receipt-id"
MD_ATTEMPTS = "tf-attempts"
MD_UNIT = "tf-unit"  # the unit of a failed request's receipt (it charged 0 of it)


@dataclass
class TFError(Exception):
    code: str
    message: str
    param: str | None = None
    receipt_id: str | None = None
    attempts: int | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        assert self.code in ERROR_TABLE, f"unknown error word {self.code!r}"
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return ERROR_TABLE[self.code][0]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return ERROR_TABLE[self.code][1]

    @property
    def error_type(self) -> str:
        return ERROR_TABLE[self.code][2]

    def openai_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "param": self.param,
            }
        }

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = [(MD_CODE, self.code)]
        if self.param:
            md.append((MD_PARAM, self.param))
        if self.receipt_id:
            md.append((MD_RECEIPT, self.receipt_id))
        if self.attempts is not None:
            md.append((MD_ATTEMPTS, str(self.attempts)))
        if self.unit:
            md.append((MD_UNIT, self.unit))
        return tuple(md)


_GRPC_FALLBACK = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
    grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key",
    grpc.StatusCode.FAILED_PRECONDITION: "insufficient_balance",
    grpc.StatusCode.PERMISSION_DENIED: "model_not_allowed",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.ALREADY_EXISTS: "conflict",
    grpc.StatusCode.DEADLINE_EXCEEDED: "upstream_timeout",
}


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> TFError:
    """Rebuild the TFError a service raised, from a failed gRPC call."""
    md: dict[str, str] = {}
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if isinstance(value, str):
            md[key] = value
    code = md.get(MD_CODE)
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(status)
    if code not in ERROR_TABLE:
        if status == grpc.StatusCode.UNAVAILABLE:
            code = "unavailable"
            details = f"a tokenforge service is unavailable: {details}"
        else:
            code = _GRPC_FALLBACK.get(status, "internal_error")
    attempts = md.get(MD_ATTEMPTS)
    return TFError(
        code=code,
        message=details,
        param=md.get(MD_PARAM),
        receipt_id=md.get(MD_RECEIPT),
        attempts=int(attempts) if attempts else None,
        unit=md.get(MD_UNIT),
    )
