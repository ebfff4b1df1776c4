-- Events of the adaptive detector (`detector = "auto"`) have kind 'auto'. The kind CHECK is
-- widened only where it does not allow 'auto' yet (a later migration may already have widened
-- it further); the wider CHECK is validated once against the stored events.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint con
         WHERE con.conrelid = 'telemetry.anomalies'::regclass AND con.contype = 'c'
           AND pg_get_constraintdef(con.oid) LIKE '%''auto''%'
    ) THEN
        ALTER TABLE telemetry.anomalies DROP CONSTRAINT anomalies_kind_check;
        ALTER TABLE telemetry.anomalies ADD CONSTRAINT anomalies_kind_check
            CHECK (kind IN ('range', 'rate', 'spike', 'drift', 'flatline', 'auto'));
    END IF;
END
$$;
