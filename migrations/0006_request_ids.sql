-- Request ids from a sequence (issue 5). Idempotent.
--
-- An accepted command's reply carries its request id, and the reply is
-- stored in the same INSERT as the row: with AUTO_INCREMENT the id was
-- known only after that INSERT, so every round updated its rows a second
-- time to complete the replies. A sequence hands the ids out before the
-- INSERT. Every INSERT into sms_requests takes its id from
-- NEXTVAL(sms_request_ids). AUTO_INCREMENT stays on the column (dropping
-- it would rebuild the table) but is no longer used: a casd from before
-- this migration must not run against this database, it would take ids
-- the sequence also hands out.
-- Sequences are not transactional: a rolled-back round leaves a gap in
-- the ids, as AUTO_INCREMENT does; ids are unique, never reused, and
-- increase in the order they are handed out.
CREATE SEQUENCE IF NOT EXISTS sms_request_ids START WITH 1 INCREMENT BY 1 CACHE 1000 NOCYCLE;

-- Continue after the ids already given (SETVAL takes only constants).
SET @casd_max_request_id = (SELECT COALESCE(MAX(id), 0) FROM sms_requests);
SET @casd_setval = CONCAT('SELECT SETVAL(sms_request_ids, ', @casd_max_request_id, ')');
PREPARE casd_setval FROM @casd_setval;
EXECUTE casd_setval;
DEALLOCATE PREPARE casd_setval;
