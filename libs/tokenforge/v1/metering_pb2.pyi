from tokenforge.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuoteRequest(_message.Message):
    __slots__ = ("model", "channel_id", "messages_json", "max_tokens", "cover_channel_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COVER_CHANNEL_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    channel_id: str
    messages_json: bytes
    max_tokens: int
    cover_channel_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., channel_id: _Optional[str] = ..., messages_json: _Optional[bytes] = ..., max_tokens: _Optional[int] = ..., cover_channel_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class QuoteResponse(_message.Message):
    __slots__ = ("amount_nano", "bucket", "prompt_tokens", "max_output_tokens")
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    amount_nano: int
    bucket: _common_pb2.Bucket
    prompt_tokens: int
    max_output_tokens: int
    def __init__(self, amount_nano: _Optional[int] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., prompt_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class RateRequest(_message.Message):
    __slots__ = ("model", "channel_id", "usage", "compare_channel_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    channel_id: str
    usage: _common_pb2.Usage
    compare_channel_id: str
    def __init__(self, model: _Optional[str] = ..., channel_id: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., compare_channel_id: _Optional[str] = ...) -> None: ...

class RateResponse(_message.Message):
    __slots__ = ("amount_nano", "bucket", "price", "compare_amount_nano", "compare_bucket")
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    COMPARE_BUCKET_FIELD_NUMBER: _ClassVar[int]
    amount_nano: int
    bucket: _common_pb2.Bucket
    price: _common_pb2.Price
    compare_amount_nano: int
    compare_bucket: _common_pb2.Bucket
    def __init__(self, amount_nano: _Optional[int] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., price: _Optional[_Union[_common_pb2.Price, _Mapping]] = ..., compare_amount_nano: _Optional[int] = ..., compare_bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("model", "messages_json", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages_json: bytes
    text: str
    def __init__(self, model: _Optional[str] = ..., messages_json: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    def __init__(self, tokens: _Optional[int] = ...) -> None: ...

class PlanStep(_message.Message):
    __slots__ = ("model", "calls", "input_tokens", "output_tokens", "step")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    step: str
    def __init__(self, model: _Optional[str] = ..., calls: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., step: _Optional[str] = ...) -> None: ...

class BucketEstimate(_message.Message):
    __slots__ = ("low_nano", "expected_nano", "high_nano")
    LOW_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NANO_FIELD_NUMBER: _ClassVar[int]
    HIGH_NANO_FIELD_NUMBER: _ClassVar[int]
    low_nano: int
    expected_nano: int
    high_nano: int
    def __init__(self, low_nano: _Optional[int] = ..., expected_nano: _Optional[int] = ..., high_nano: _Optional[int] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EstimateRunRequest(_message.Message):
    __slots__ = ("plan", "route_policy", "allowed_models", "balances", "budget_wallet_nano", "budget_credit_nano")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ROUTE_POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_WALLET_NANO_FIELD_NUMBER: _ClassVar[int]
    BUDGET_CREDIT_NANO_FIELD_NUMBER: _ClassVar[int]
    plan: _containers.RepeatedCompositeFieldContainer[PlanStep]
    route_policy: _common_pb2.RoutePolicy
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    balances: _common_pb2.Balances
    budget_wallet_nano: int
    budget_credit_nano: int
    def __init__(self, plan: _Optional[_Iterable[_Union[PlanStep, _Mapping]]] = ..., route_policy: _Optional[_Union[_common_pb2.RoutePolicy, str]] = ..., allowed_models: _Optional[_Iterable[str]] = ..., balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., budget_wallet_nano: _Optional[int] = ..., budget_credit_nano: _Optional[int] = ...) -> None: ...

class EstimateRunResponse(_message.Message):
    __slots__ = ("wallet", "credit", "warnings")
    WALLET_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    wallet: BucketEstimate
    credit: BucketEstimate
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    def __init__(self, wallet: _Optional[_Union[BucketEstimate, _Mapping]] = ..., credit: _Optional[_Union[BucketEstimate, _Mapping]] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ...) -> None: ...

class MeteringCall(_message.Message):
    __slots__ = ("trace_context", "quote", "rate")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    trace_context: _containers.ScalarMap[str, str]
    quote: QuoteRequest
    rate: RateRequest
    def __init__(self, trace_context: _Optional[_Mapping[str, str]] = ..., quote: _Optional[_Union[QuoteRequest, _Mapping]] = ..., rate: _Optional[_Union[RateRequest, _Mapping]] = ...) -> None: ...

class MeteringBatchRequest(_message.Message):
    __slots__ = ("calls", "seq", "timeout_ms")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[MeteringCall]
    seq: int
    timeout_ms: int
    def __init__(self, calls: _Optional[_Iterable[_Union[MeteringCall, _Mapping]]] = ..., seq: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class MeteringOutcome(_message.Message):
    __slots__ = ("quote", "rate", "error")
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    quote: QuoteResponse
    rate: RateResponse
    error: _common_pb2.CallError
    def __init__(self, quote: _Optional[_Union[QuoteResponse, _Mapping]] = ..., rate: _Optional[_Union[RateResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.CallError, _Mapping]] = ...) -> None: ...

class MeteringBatchResponse(_message.Message):
    __slots__ = ("outcomes", "seq")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[MeteringOutcome]
    seq: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[MeteringOutcome, _Mapping]]] = ..., seq: _Optional[int] = ...) -> None: ...
