from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Bucket(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUCKET_UNSPECIFIED: _ClassVar[Bucket]
    BUCKET_WALLET: _ClassVar[Bucket]
    BUCKET_CREDIT: _ClassVar[Bucket]

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_ROUTED: _ClassVar[Route]
    ROUTE_DIRECT: _ClassVar[Route]

class RoutePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_POLICY_UNSPECIFIED: _ClassVar[RoutePolicy]
    ROUTE_POLICY_ROUTED: _ClassVar[RoutePolicy]
    ROUTE_POLICY_DIRECT: _ClassVar[RoutePolicy]
    ROUTE_POLICY_AUTO: _ClassVar[RoutePolicy]
BUCKET_UNSPECIFIED: Bucket
BUCKET_WALLET: Bucket
BUCKET_CREDIT: Bucket
ROUTE_UNSPECIFIED: Route
ROUTE_ROUTED: Route
ROUTE_DIRECT: Route
ROUTE_POLICY_UNSPECIFIED: RoutePolicy
ROUTE_POLICY_ROUTED: RoutePolicy
ROUTE_POLICY_DIRECT: RoutePolicy
ROUTE_POLICY_AUTO: RoutePolicy

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ...) -> None: ...

class Price(_message.Message):
    __slots__ = ("bucket", "input_nano", "output_nano", "cached_input_nano")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    INPUT_NANO_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NANO_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_NANO_FIELD_NUMBER: _ClassVar[int]
    bucket: Bucket
    input_nano: int
    output_nano: int
    cached_input_nano: int
    def __init__(self, bucket: _Optional[_Union[Bucket, str]] = ..., input_nano: _Optional[int] = ..., output_nano: _Optional[int] = ..., cached_input_nano: _Optional[int] = ...) -> None: ...

class BucketBalance(_message.Message):
    __slots__ = ("unit", "balance_nano", "held_nano", "available_nano")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    HELD_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    unit: str
    balance_nano: int
    held_nano: int
    available_nano: int
    def __init__(self, unit: _Optional[str] = ..., balance_nano: _Optional[int] = ..., held_nano: _Optional[int] = ..., available_nano: _Optional[int] = ...) -> None: ...

class Balances(_message.Message):
    __slots__ = ("account_id", "name", "wallet", "credit")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WALLET_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    name: str
    wallet: BucketBalance
    credit: BucketBalance
    def __init__(self, account_id: _Optional[str] = ..., name: _Optional[str] = ..., wallet: _Optional[_Union[BucketBalance, _Mapping]] = ..., credit: _Optional[_Union[BucketBalance, _Mapping]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message", "param")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    param: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "param")
    CODE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    code: str
    param: str
    def __init__(self, code: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...
