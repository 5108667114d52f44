-- Indexes found missing under load (issue 5). Idempotent.

-- The EMMG's supersession lookup reads the *live* unique EMMs of the
-- devices of a batch. With state after purpose, the index walked every
-- EMM a device ever had (withdrawn ones included, and each refresh
-- withdraws one): state now comes before purpose, so a lookup touches
-- live rows only; lookups by (addressing, address, purpose, state) still
-- use all four columns.
ALTER TABLE emms
  DROP INDEX IF EXISTS ix_emms_address,
  ADD INDEX IF NOT EXISTS ix_emms_address_state (addressing, address, state, purpose);

-- GET /requests/{id} reads the request's work item: without this index,
-- a scan of the whole outbox.
CREATE INDEX IF NOT EXISTS ix_work_items_request ON work_items (request_id);
