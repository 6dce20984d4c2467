from tokenforge.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdjustmentDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADJUSTMENT_DIRECTION_UNSPECIFIED: _ClassVar[AdjustmentDirection]
    ADJUSTMENT_DIRECTION_CREDIT: _ClassVar[AdjustmentDirection]
    ADJUSTMENT_DIRECTION_DEBIT: _ClassVar[AdjustmentDirection]
ADJUSTMENT_DIRECTION_UNSPECIFIED: AdjustmentDirection
ADJUSTMENT_DIRECTION_CREDIT: AdjustmentDirection
ADJUSTMENT_DIRECTION_DEBIT: AdjustmentDirection

class Account(_message.Message):
    __slots__ = ("id", "name", "balances", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    balances: _common_pb2.Balances
    created_at: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., created_at: _Optional[str] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class TopUpRequest(_message.Message):
    __slots__ = ("account_id", "bucket", "amount_nano", "idempotency_key")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    bucket: _common_pb2.Bucket
    amount_nano: int
    idempotency_key: str
    def __init__(self, account_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., amount_nano: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class TopUpResponse(_message.Message):
    __slots__ = ("topup_id", "balances", "replayed")
    TOPUP_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    topup_id: str
    balances: _common_pb2.Balances
    replayed: bool
    def __init__(self, topup_id: _Optional[str] = ..., balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RefundRequest(_message.Message):
    __slots__ = ("receipt_id", "amount_nano", "idempotency_key", "reason")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    amount_nano: int
    idempotency_key: str
    reason: str
    def __init__(self, receipt_id: _Optional[str] = ..., amount_nano: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Refund(_message.Message):
    __slots__ = ("id", "receipt_id", "account_id", "bucket", "amount_nano", "reason", "created_at", "receipt_amount_nano", "receipt_refunded_nano")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_REFUNDED_NANO_FIELD_NUMBER: _ClassVar[int]
    id: str
    receipt_id: str
    account_id: str
    bucket: _common_pb2.Bucket
    amount_nano: int
    reason: str
    created_at: str
    receipt_amount_nano: int
    receipt_refunded_nano: int
    def __init__(self, id: _Optional[str] = ..., receipt_id: _Optional[str] = ..., account_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., amount_nano: _Optional[int] = ..., reason: _Optional[str] = ..., created_at: _Optional[str] = ..., receipt_amount_nano: _Optional[int] = ..., receipt_refunded_nano: _Optional[int] = ...) -> None: ...

class RefundResponse(_message.Message):
    __slots__ = ("refund", "balances", "replayed")
    REFUND_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    refund: Refund
    balances: _common_pb2.Balances
    replayed: bool
    def __init__(self, refund: _Optional[_Union[Refund, _Mapping]] = ..., balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AdjustRequest(_message.Message):
    __slots__ = ("account_id", "bucket", "amount_nano", "direction", "reason", "idempotency_key")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    bucket: _common_pb2.Bucket
    amount_nano: int
    direction: AdjustmentDirection
    reason: str
    idempotency_key: str
    def __init__(self, account_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., amount_nano: _Optional[int] = ..., direction: _Optional[_Union[AdjustmentDirection, str]] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Adjustment(_message.Message):
    __slots__ = ("id", "account_id", "bucket", "direction", "amount_nano", "reason", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    account_id: str
    bucket: _common_pb2.Bucket
    direction: AdjustmentDirection
    amount_nano: int
    reason: str
    created_at: str
    def __init__(self, id: _Optional[str] = ..., account_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., direction: _Optional[_Union[AdjustmentDirection, str]] = ..., amount_nano: _Optional[int] = ..., reason: _Optional[str] = ..., created_at: _Optional[str] = ...) -> None: ...

class AdjustResponse(_message.Message):
    __slots__ = ("adjustment", "balances", "replayed")
    ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    adjustment: Adjustment
    balances: _common_pb2.Balances
    replayed: bool
    def __init__(self, adjustment: _Optional[_Union[Adjustment, _Mapping]] = ..., balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class KeyLimits(_message.Message):
    __slots__ = ("wallet_total_nano", "wallet_daily_nano", "credit_total_nano", "credit_daily_nano")
    WALLET_TOTAL_NANO_FIELD_NUMBER: _ClassVar[int]
    WALLET_DAILY_NANO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TOTAL_NANO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_DAILY_NANO_FIELD_NUMBER: _ClassVar[int]
    wallet_total_nano: int
    wallet_daily_nano: int
    credit_total_nano: int
    credit_daily_nano: int
    def __init__(self, wallet_total_nano: _Optional[int] = ..., wallet_daily_nano: _Optional[int] = ..., credit_total_nano: _Optional[int] = ..., credit_daily_nano: _Optional[int] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("id", "name", "account_id", "route_policy", "allowed_models", "limits", "revoked", "created_at", "prefix")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    account_id: str
    route_policy: _common_pb2.RoutePolicy
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    revoked: bool
    created_at: str
    prefix: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., account_id: _Optional[str] = ..., route_policy: _Optional[_Union[_common_pb2.RoutePolicy, str]] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., revoked: _Optional[bool] = ..., created_at: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("account_id", "name", "route_policy", "allowed_models", "limits")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUTE_POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    name: str
    route_policy: _common_pb2.RoutePolicy
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    def __init__(self, account_id: _Optional[str] = ..., name: _Optional[str] = ..., route_policy: _Optional[_Union[_common_pb2.RoutePolicy, str]] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ...) -> None: ...

class CreatedKey(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: Key
    secret: str
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class AuthenticateKeyRequest(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: str
    def __init__(self, secret: _Optional[str] = ...) -> None: ...

class GetKeyBalanceRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class KeyBalance(_message.Message):
    __slots__ = ("balances", "key", "spent_wallet_nano", "spent_credit_nano")
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SPENT_WALLET_NANO_FIELD_NUMBER: _ClassVar[int]
    SPENT_CREDIT_NANO_FIELD_NUMBER: _ClassVar[int]
    balances: _common_pb2.Balances
    key: Key
    spent_wallet_nano: int
    spent_credit_nano: int
    def __init__(self, balances: _Optional[_Union[_common_pb2.Balances, _Mapping]] = ..., key: _Optional[_Union[Key, _Mapping]] = ..., spent_wallet_nano: _Optional[int] = ..., spent_credit_nano: _Optional[int] = ...) -> None: ...

class HoldRequest(_message.Message):
    __slots__ = ("request_id", "key_id", "bucket", "amount_nano", "run_id", "ttl_s", "unsettled_receipt_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    UNSETTLED_RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    key_id: str
    bucket: _common_pb2.Bucket
    amount_nano: int
    run_id: str
    ttl_s: int
    unsettled_receipt_json: bytes
    def __init__(self, request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., amount_nano: _Optional[int] = ..., run_id: _Optional[str] = ..., ttl_s: _Optional[int] = ..., unsettled_receipt_json: _Optional[bytes] = ...) -> None: ...

class HoldResponse(_message.Message):
    __slots__ = ("hold_id", "amount_nano", "expires_at", "replayed")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    amount_nano: int
    expires_at: str
    replayed: bool
    def __init__(self, hold_id: _Optional[str] = ..., amount_nano: _Optional[int] = ..., expires_at: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "bucket")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bucket: _common_pb2.Bucket
    def __init__(self, request_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_nano", "replayed")
    RELEASED_NANO_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    released_nano: int
    replayed: bool
    def __init__(self, released_nano: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "key_id", "bucket", "rated_nano", "status", "receipt_json", "run_id", "run_step", "receipt_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    RATED_NANO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    key_id: str
    bucket: _common_pb2.Bucket
    rated_nano: int
    status: str
    receipt_json: bytes
    run_id: str
    run_step: str
    receipt_id: str
    def __init__(self, request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., rated_nano: _Optional[int] = ..., status: _Optional[str] = ..., receipt_json: _Optional[bytes] = ..., run_id: _Optional[str] = ..., run_step: _Optional[str] = ..., receipt_id: _Optional[str] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("receipt_id", "amount_nano", "uncollected_nano", "held_nano", "released_nano", "replayed")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    UNCOLLECTED_NANO_FIELD_NUMBER: _ClassVar[int]
    HELD_NANO_FIELD_NUMBER: _ClassVar[int]
    RELEASED_NANO_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    amount_nano: int
    uncollected_nano: int
    held_nano: int
    released_nano: int
    replayed: bool
    def __init__(self, receipt_id: _Optional[str] = ..., amount_nano: _Optional[int] = ..., uncollected_nano: _Optional[int] = ..., held_nano: _Optional[int] = ..., released_nano: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("id", "receipt_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    receipt_json: bytes
    def __init__(self, id: _Optional[str] = ..., receipt_json: _Optional[bytes] = ...) -> None: ...

class GetReceiptRequest(_message.Message):
    __slots__ = ("receipt_id", "key_id")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    key_id: str
    def __init__(self, receipt_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class ListReceiptsRequest(_message.Message):
    __slots__ = ("key_id", "account_id", "limit", "after", "run_id")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    account_id: str
    limit: int
    after: str
    run_id: str
    def __init__(self, key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class ListReceiptsResponse(_message.Message):
    __slots__ = ("receipts", "has_more", "last_id")
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    has_more: bool
    last_id: str
    def __init__(self, receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ..., has_more: _Optional[bool] = ..., last_id: _Optional[str] = ...) -> None: ...

class GetStatementRequest(_message.Message):
    __slots__ = ("key_id", "account_id", "bucket", "limit", "after")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    account_id: str
    bucket: _common_pb2.Bucket
    limit: int
    after: str
    def __init__(self, key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class StatementEntry(_message.Message):
    __slots__ = ("id", "at", "kind", "bucket", "amount_nano", "balance_nano", "receipt_id", "key_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    at: str
    kind: str
    bucket: _common_pb2.Bucket
    amount_nano: int
    balance_nano: int
    receipt_id: str
    key_id: str
    def __init__(self, id: _Optional[str] = ..., at: _Optional[str] = ..., kind: _Optional[str] = ..., bucket: _Optional[_Union[_common_pb2.Bucket, str]] = ..., amount_nano: _Optional[int] = ..., balance_nano: _Optional[int] = ..., receipt_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class Statement(_message.Message):
    __slots__ = ("entries", "has_more", "last_id")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StatementEntry]
    has_more: bool
    last_id: str
    def __init__(self, entries: _Optional[_Iterable[_Union[StatementEntry, _Mapping]]] = ..., has_more: _Optional[bool] = ..., last_id: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("ok", "problems", "accounts_checked")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    accounts_checked: int
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ..., accounts_checked: _Optional[int] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("key_id", "name", "budget_wallet_nano", "budget_credit_nano", "estimate_json", "ttl_s")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGET_WALLET_NANO_FIELD_NUMBER: _ClassVar[int]
    BUDGET_CREDIT_NANO_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_JSON_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    name: str
    budget_wallet_nano: int
    budget_credit_nano: int
    estimate_json: bytes
    ttl_s: int
    def __init__(self, key_id: _Optional[str] = ..., name: _Optional[str] = ..., budget_wallet_nano: _Optional[int] = ..., budget_credit_nano: _Optional[int] = ..., estimate_json: _Optional[bytes] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id", "key_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key_id: str
    def __init__(self, run_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class CloseRunRequest(_message.Message):
    __slots__ = ("run_id", "key_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key_id: str
    def __init__(self, run_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("id", "key_id", "name", "status", "report_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    key_id: str
    name: str
    status: str
    report_json: bytes
    def __init__(self, id: _Optional[str] = ..., key_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., report_json: _Optional[bytes] = ...) -> None: ...

class RecordRefusalRequest(_message.Message):
    __slots__ = ("run_id", "key_id", "code")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key_id: str
    code: str
    def __init__(self, run_id: _Optional[str] = ..., key_id: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class RecordRefusalResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LedgerCall(_message.Message):
    __slots__ = ("trace_context", "hold", "release", "settle")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SETTLE_FIELD_NUMBER: _ClassVar[int]
    trace_context: _containers.ScalarMap[str, str]
    hold: HoldRequest
    release: ReleaseRequest
    settle: SettleRequest
    def __init__(self, trace_context: _Optional[_Mapping[str, str]] = ..., hold: _Optional[_Union[HoldRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., settle: _Optional[_Union[SettleRequest, _Mapping]] = ...) -> None: ...

class LedgerBatchRequest(_message.Message):
    __slots__ = ("calls", "seq", "timeout_ms")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[LedgerCall]
    seq: int
    timeout_ms: int
    def __init__(self, calls: _Optional[_Iterable[_Union[LedgerCall, _Mapping]]] = ..., seq: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class LedgerOutcome(_message.Message):
    __slots__ = ("hold", "release", "settle", "error")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SETTLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    hold: HoldResponse
    release: ReleaseResponse
    settle: SettleResponse
    error: _common_pb2.CallError
    def __init__(self, hold: _Optional[_Union[HoldResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., settle: _Optional[_Union[SettleResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.CallError, _Mapping]] = ...) -> None: ...

class LedgerBatchResponse(_message.Message):
    __slots__ = ("outcomes", "seq")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[LedgerOutcome]
    seq: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[LedgerOutcome, _Mapping]]] = ..., seq: _Optional[int] = ...) -> None: ...
