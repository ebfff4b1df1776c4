-- Every sensor has its device, checked once per statement instead of once per row.
--
-- A plant's first sight registers tens of thousands of sensors in one INSERT; the foreign key
-- sensors.device_id -> devices ran its check (an index look-up and a row lock on the device)
-- for every one of them, about a third of the statement's time. The triggers below keep the
-- same guarantee with one set-based check per statement: the devices a statement's new
-- sensors name are locked FOR KEY SHARE, as the foreign key's check locked them, so a device
-- cannot be deleted while a transaction registering a sensor of it is open, and a sensor of a
-- device deleted meanwhile is refused. A device that sensors name cannot be deleted, given
-- another id, or truncated away either (checked with a fresh snapshot of committed sensors:
-- delete devices in READ COMMITTED).
--
-- The functions run as the schema owner: locking rows FOR KEY SHARE takes a privilege the
-- ingest role does not have on devices (UPDATE), and they take nothing but those locks.

ALTER TABLE telemetry.sensors DROP CONSTRAINT sensors_device_id_fkey;

-- Inserted sensors (statement level, the statement's new rows) and a sensor given another
-- device (row level): each device named must exist, and is locked until commit.
CREATE FUNCTION telemetry.sensors_check_device() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    wanted  bigint;
    locked  bigint;
    missing integer;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        PERFORM 1 FROM telemetry.devices d WHERE d.id = NEW.device_id FOR KEY SHARE OF d;
        IF NOT FOUND THEN
            missing := NEW.device_id;
        END IF;
    ELSE
        SELECT count(DISTINCT device_id) INTO wanted FROM new_sensors;
        IF wanted = 0 THEN
            RETURN NULL;
        END IF;
        SELECT count(*) INTO locked
          FROM (SELECT 1 FROM telemetry.devices d
                 WHERE d.id IN (SELECT device_id FROM new_sensors)
                   FOR KEY SHARE OF d) AS l;
        IF locked <> wanted THEN
            SELECT n.device_id INTO missing
              FROM new_sensors n
             WHERE NOT EXISTS (SELECT 1 FROM telemetry.devices d WHERE d.id = n.device_id)
             LIMIT 1;
        END IF;
    END IF;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'insert or update on table "sensors" violates the sensor''s device check'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (device_id)=(%s) is not present in table "devices".',
                                  missing),
                  TABLE = 'sensors', SCHEMA = 'telemetry';
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION telemetry.sensors_check_device() FROM PUBLIC;

CREATE TRIGGER sensors_check_device_insert
    AFTER INSERT ON telemetry.sensors
    REFERENCING NEW TABLE AS new_sensors
    FOR EACH STATEMENT EXECUTE FUNCTION telemetry.sensors_check_device();
CREATE TRIGGER sensors_check_device_update
    AFTER UPDATE OF device_id ON telemetry.sensors
    FOR EACH ROW WHEN (OLD.device_id IS DISTINCT FROM NEW.device_id)
    EXECUTE FUNCTION telemetry.sensors_check_device();

-- A device that sensors name stays: no delete, no new id, no truncate.
CREATE FUNCTION telemetry.devices_check_sensors() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    named integer;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        SELECT s.device_id INTO named FROM telemetry.sensors s LIMIT 1;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT s.device_id INTO named
          FROM old_devices o JOIN telemetry.sensors s ON s.device_id = o.id LIMIT 1;
    ELSE
        SELECT s.device_id INTO named FROM telemetry.sensors s WHERE s.device_id = OLD.id LIMIT 1;
    END IF;
    IF named IS NOT NULL THEN
        RAISE EXCEPTION 'update or delete on table "devices" violates the sensor''s device check'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (id)=(%s) is still referenced from table "sensors".',
                                  named),
                  TABLE = 'devices', SCHEMA = 'telemetry';
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION telemetry.devices_check_sensors() FROM PUBLIC;

CREATE TRIGGER devices_check_sensors_delete
    AFTER DELETE ON telemetry.devices
    REFERENCING OLD TABLE AS old_devices
    FOR EACH STATEMENT EXECUTE FUNCTION telemetry.devices_check_sensors();
CREATE TRIGGER devices_check_sensors_update
    AFTER UPDATE OF id ON telemetry.devices
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION telemetry.devices_check_sensors();
CREATE TRIGGER devices_check_sensors_truncate
    BEFORE TRUNCATE ON telemetry.devices
    FOR EACH STATEMENT EXECUTE FUNCTION telemetry.devices_check_sensors();
