-- A dead letter is stored once. The broker delivers a message again when the ingester stopped
-- between committing it and acknowledging it, and devices resend unchanged payloads; both are
-- recognised by the digest of the message's topic, content type and payload, within the window
-- in which a redelivery can arrive (see ingest/db/dead_letters.py).
ALTER TABLE telemetry.dead_letters ADD COLUMN digest bytea;
CREATE INDEX dead_letters_digest_idx ON telemetry.dead_letters (digest, received_at DESC);
