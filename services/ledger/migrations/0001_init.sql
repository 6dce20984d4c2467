-- tokenforge ledger, schema 1.
-- Money is BIGINT nano-units (1e-9 of the bucket's unit) everywhere; never NUMERIC/float.
--
-- Double entry: `transfers` is the journal. Each row moves `amount_nano` (> 0) from one ledger
-- account (`src`) to another (`dst`) of the same unit, i.e. it is a balanced pair of postings
-- (-amount on src, +amount on dst); the `postings` view spells them out. Ledger accounts are
--   customer     the available part of a customer bucket (account_id, bucket)
--   holds        money in flight (request holds and run reservations)   } per unit, tagged with
--   revenue      captured charges                                       } the customer account
--   funding      where top-ups come from (goes negative)                } so each can be audited
--   uncollected  rated cost nobody could pay (goes negative)            } per customer too
-- System accounts have no balance row: their balances are sums of postings, so no request
-- ever waits on a "revenue" row.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Balances kept for speed (checked against postings by Audit). balance includes held.
CREATE TABLE buckets (
    account_id    text NOT NULL REFERENCES accounts (id),
    bucket        text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    unit          text NOT NULL CHECK (unit IN ('CNY', 'CREDIT')),
    balance_nano  bigint NOT NULL DEFAULT 0 CHECK (balance_nano >= 0),
    held_nano     bigint NOT NULL DEFAULT 0 CHECK (held_nano >= 0 AND held_nano <= balance_nano),
    PRIMARY KEY (account_id, bucket)
);

CREATE TABLE keys (
    id                  text PRIMARY KEY,
    account_id          text NOT NULL REFERENCES accounts (id),
    name                text NOT NULL,
    secret_sha256       bytea NOT NULL UNIQUE,
    prefix              text NOT NULL,
    route_policy        text NOT NULL CHECK (route_policy IN ('routed', 'direct', 'auto')),
    allowed_models      text[] NOT NULL DEFAULT '{}',
    wallet_total_nano   bigint NOT NULL DEFAULT 0 CHECK (wallet_total_nano >= 0),
    wallet_daily_nano   bigint NOT NULL DEFAULT 0 CHECK (wallet_daily_nano >= 0),
    credit_total_nano   bigint NOT NULL DEFAULT 0 CHECK (credit_total_nano >= 0),
    credit_daily_nano   bigint NOT NULL DEFAULT 0 CHECK (credit_daily_nano >= 0),
    revoked             boolean NOT NULL DEFAULT false,
    revoked_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- usage kept for the limit checks (spent = charged amounts; held = active holds and run
    -- reservations of this key); day_* is the spend of UTC day `day`.
    spent_wallet_nano   bigint NOT NULL DEFAULT 0 CHECK (spent_wallet_nano >= 0),
    spent_credit_nano   bigint NOT NULL DEFAULT 0 CHECK (spent_credit_nano >= 0),
    held_wallet_nano    bigint NOT NULL DEFAULT 0 CHECK (held_wallet_nano >= 0),
    held_credit_nano    bigint NOT NULL DEFAULT 0 CHECK (held_credit_nano >= 0),
    day                 date,
    day_wallet_nano     bigint NOT NULL DEFAULT 0 CHECK (day_wallet_nano >= 0),
    day_credit_nano     bigint NOT NULL DEFAULT 0 CHECK (day_credit_nano >= 0)
);
CREATE INDEX keys_account ON keys (account_id, created_at);

CREATE TABLE runs (
    id                   text PRIMARY KEY,
    key_id               text NOT NULL REFERENCES keys (id),
    account_id           text NOT NULL REFERENCES accounts (id),
    name                 text NOT NULL,
    status               text NOT NULL CHECK (status IN ('open', 'closed', 'expired')),
    budget_wallet_nano   bigint NOT NULL DEFAULT 0 CHECK (budget_wallet_nano >= 0),
    budget_credit_nano   bigint NOT NULL DEFAULT 0 CHECK (budget_credit_nano >= 0),
    -- what the run's reservation still holds (not yet drawn by a request hold)
    reserved_wallet_nano bigint NOT NULL DEFAULT 0 CHECK (reserved_wallet_nano >= 0),
    reserved_credit_nano bigint NOT NULL DEFAULT 0 CHECK (reserved_credit_nano >= 0),
    spent_wallet_nano    bigint NOT NULL DEFAULT 0 CHECK (spent_wallet_nano >= 0),
    spent_credit_nano    bigint NOT NULL DEFAULT 0 CHECK (spent_credit_nano >= 0),
    refused              integer NOT NULL DEFAULT 0,
    estimate             jsonb,
    expires_at           timestamptz NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    closed_at            timestamptz
);
CREATE INDEX runs_key ON runs (key_id, created_at);
CREATE INDEX runs_open_expiry ON runs (expires_at) WHERE status = 'open';

CREATE TABLE holds (
    id            text PRIMARY KEY,
    request_id    text NOT NULL,
    bucket        text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    account_id    text NOT NULL REFERENCES accounts (id),
    key_id        text NOT NULL REFERENCES keys (id),
    run_id        text REFERENCES runs (id),
    run_funded    boolean NOT NULL DEFAULT false,  -- drawn from the run's reservation
    amount_nano   bigint NOT NULL CHECK (amount_nano > 0),
    state         text NOT NULL CHECK (state IN ('active', 'captured', 'released', 'expired')),
    captured_nano bigint NOT NULL DEFAULT 0 CHECK (captured_nano >= 0),
    released_nano bigint NOT NULL DEFAULT 0 CHECK (released_nano >= 0),
    ttl_s         integer NOT NULL,
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL,
    closed_at     timestamptz,
    UNIQUE (request_id, bucket),
    CHECK (state = 'active' OR captured_nano + released_nano = amount_nano)
);
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE state = 'active';

CREATE TABLE topups (
    id               text PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    account_id       text NOT NULL REFERENCES accounts (id),
    bucket           text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    amount_nano      bigint NOT NULL CHECK (amount_nano > 0),
    created_at       timestamptz NOT NULL
);

CREATE TABLE receipts (
    seq               bigserial UNIQUE,
    id                text PRIMARY KEY,
    request_id        text NOT NULL UNIQUE,
    key_id            text NOT NULL REFERENCES keys (id),
    account_id        text NOT NULL REFERENCES accounts (id),
    run_id            text REFERENCES runs (id),
    run_step          text,
    status            text NOT NULL CHECK (status IN ('settled', 'failed', 'partial', 'cancelled')),
    bucket            text CHECK (bucket IN ('wallet', 'credit')),
    rated_nano        bigint NOT NULL CHECK (rated_nano >= 0),
    amount_nano       bigint NOT NULL CHECK (amount_nano >= 0),
    uncollected_nano  bigint NOT NULL CHECK (uncollected_nano >= 0),
    held_nano         bigint NOT NULL CHECK (held_nano >= 0),
    released_nano     bigint NOT NULL CHECK (released_nano >= 0),
    created_at        timestamptz NOT NULL,
    body              jsonb NOT NULL,
    CHECK (amount_nano + uncollected_nano = rated_nano)
);
CREATE INDEX receipts_key ON receipts (key_id, seq);
CREATE INDEX receipts_account ON receipts (account_id, seq);
CREATE INDEX receipts_run ON receipts (run_id, seq) WHERE run_id IS NOT NULL;

CREATE TABLE transfers (
    id                  bigserial PRIMARY KEY,
    at                  timestamptz NOT NULL,
    kind                text NOT NULL CHECK (kind IN (
                            'topup', 'hold', 'capture', 'release', 'expiry', 'uncollected',
                            'run_hold', 'run_release', 'refund', 'adjustment')),
    unit                text NOT NULL CHECK (unit IN ('CNY', 'CREDIT')),
    src                 text NOT NULL CHECK (src IN ('customer', 'holds', 'revenue', 'funding', 'uncollected')),
    dst                 text NOT NULL CHECK (dst IN ('customer', 'holds', 'revenue', 'funding', 'uncollected')),
    amount_nano         bigint NOT NULL CHECK (amount_nano > 0),
    account_id          text NOT NULL,
    bucket              text NOT NULL CHECK (bucket IN ('wallet', 'credit')),
    key_id              text,
    ref                 text,    -- the hold, run, receipt or top-up this movement belongs to
    receipt_id          text,
    -- the customer bucket's balance (available + held) after this transfer
    balance_after_nano  bigint NOT NULL CHECK (balance_after_nano >= 0),
    CHECK (src <> dst)
);
CREATE INDEX transfers_account ON transfers (account_id, bucket, id);
CREATE INDEX transfers_key ON transfers (key_id, id) WHERE key_id IS NOT NULL;

CREATE VIEW postings AS
    SELECT id AS transfer_id, at, kind, unit, account_id, bucket, src AS ledger_account,
           -amount_nano AS amount_nano
      FROM transfers
    UNION ALL
    SELECT id, at, kind, unit, account_id, bucket, dst, amount_nano
      FROM transfers;
