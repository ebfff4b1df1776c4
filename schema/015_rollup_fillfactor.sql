-- Every rollup merge updates the row of each sensor and minute (rollup_1m) and of each sensor
-- and hour (rollup_1h) that its partials fall in: with a plant of 100,000 sensors, 100,000 rows
-- of each table per merge. Room left in every page keeps such an update on its page (a HOT
-- update: no new index entry), as for telemetry.anomaly_state. TimescaleDB applies the setting
-- to the existing chunks and to every new one.
ALTER TABLE telemetry.rollup_1m SET (fillfactor = 50);
ALTER TABLE telemetry.rollup_1h SET (fillfactor = 50);
