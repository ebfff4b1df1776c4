-- Events of the adaptive detector (`detector = "auto"`) have kind 'auto'. The wider CHECK is
-- validated once against the stored events (one scan of telemetry.anomalies).
ALTER TABLE telemetry.anomalies DROP CONSTRAINT anomalies_kind_check;
ALTER TABLE telemetry.anomalies ADD CONSTRAINT anomalies_kind_check
    CHECK (kind IN ('range', 'rate', 'spike', 'drift', 'flatline', 'auto'));
