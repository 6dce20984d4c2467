-- Refunds and adjustments: the two movements that had a journal kind but no operation.
--
-- refund      revenue → customer, in the bucket that paid the receipt (transfers.receipt_id is
--             the receipt, ref the refund). A receipt's refunded total is kept on it, raised
--             by the writers' compare-and-set write, and can never pass what it collected.
-- adjustment  funding → customer (credit) or customer → funding (debit), with a reason.
-- Both are idempotent by a unique idempotency key, like top-ups.

ALTER TABLE receipts ADD COLUMN refunded_nano bigint NOT NULL DEFAULT 0;
-- The last line of defence: whatever a writer computed, the database refuses a refunded
-- total above the receipt's collected amount.
ALTER TABLE receipts ADD CONSTRAINT receipts_refunded_within_amount
    CHECK (refunded_nano >= 0 AND refunded_nano <= amount_nano);

CREATE TABLE refunds (
    id               text PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    receipt_id       text NOT NULL REFERENCES receipts (id),
    account_id       text NOT NULL REFERENCES accounts (id),
    bucket           text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    amount_nano      bigint NOT NULL CHECK (amount_nano > 0),
    reason           text NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    created_at       timestamptz NOT NULL
);
CREATE INDEX refunds_receipt ON refunds (receipt_id);

CREATE TABLE adjustments (
    id               text PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    account_id       text NOT NULL REFERENCES accounts (id),
    bucket           text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    direction        text NOT NULL CHECK (direction IN ('credit', 'debit')),
    amount_nano      bigint NOT NULL CHECK (amount_nano > 0),
    reason           text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    created_at       timestamptz NOT NULL
);
CREATE INDEX adjustments_account ON adjustments (account_id, created_at);
