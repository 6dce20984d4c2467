from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatCompletionRequest(_message.Message):
    __slots__ = ("body_json", "run_id", "run_step", "request_id")
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    body_json: bytes
    run_id: str
    run_step: str
    request_id: str
    def __init__(self, body_json: _Optional[bytes] = ..., run_id: _Optional[str] = ..., run_step: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Settlement(_message.Message):
    __slots__ = ("receipt_id", "amount", "unit", "attempts", "status")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    amount: str
    unit: str
    attempts: int
    status: str
    def __init__(self, receipt_id: _Optional[str] = ..., amount: _Optional[str] = ..., unit: _Optional[str] = ..., attempts: _Optional[int] = ..., status: _Optional[str] = ...) -> None: ...

class ChatCompletionResponse(_message.Message):
    __slots__ = ("body_json", "settlement")
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    SETTLEMENT_FIELD_NUMBER: _ClassVar[int]
    body_json: bytes
    settlement: Settlement
    def __init__(self, body_json: _Optional[bytes] = ..., settlement: _Optional[_Union[Settlement, _Mapping]] = ...) -> None: ...

class ChatCompletionChunk(_message.Message):
    __slots__ = ("chunk_json", "settlement", "error_json")
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    SETTLEMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_JSON_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    settlement: Settlement
    error_json: bytes
    def __init__(self, chunk_json: _Optional[bytes] = ..., settlement: _Optional[_Union[Settlement, _Mapping]] = ..., error_json: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("body_json",)
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    body_json: bytes
    def __init__(self, body_json: _Optional[bytes] = ...) -> None: ...

class RunRef(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("body_json",)
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    body_json: bytes
    def __init__(self, body_json: _Optional[bytes] = ...) -> None: ...
