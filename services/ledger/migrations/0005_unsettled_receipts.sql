-- A receipt for every request that reached an upstream, also when its router died before
-- settling it (kill -9, a lost machine).
--
-- holds.unsettled_receipt  the receipt the router drafted at admission (SPEC §5, status
--                          `failed`, no attempts), as sent with the hold. When the last of a
--                          request's holds expires and the request has no receipt, the reaper
--                          writes this one, charging nothing, in the same transaction.
-- receipts.unsettled       true for such a receipt. A Settle that arrives after it (a router
--                          that was only slow) replaces it: same id, the real attempts and
--                          charge. Any other receipt is final.

ALTER TABLE holds ADD COLUMN unsettled_receipt text;
ALTER TABLE receipts ADD COLUMN unsettled boolean NOT NULL DEFAULT false;
