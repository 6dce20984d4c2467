-- The writers' batch statement ends with ledger_check(<every conditional update touched the
-- rows it expected>): false means a row changed since the batch read it; raising a
-- serialization failure undoes the whole statement and the writer retries the batch.
CREATE OR REPLACE FUNCTION ledger_check(ok boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'ledger rows changed since the batch read them'
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END
$$;
