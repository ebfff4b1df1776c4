-- Sparkplug B: which edge nodes and devices are online, and the version check that lets
-- several ingesters change a node's state without losing one another's changes.
--
-- `sparkplug_nodes.birth_id` now changes with every birth and every death of the node (it is
-- the version of everything this file and 004 keep about the node). A flush that changes a
-- node (a birth or a death) calls sparkplug_check first, in its transaction: the call locks the
-- flush's nodes in node order and fails with serialization_failure (40001, retried) if one of
-- them is not at the version the flush read; the flush then reads the nodes again.

-- One row per edge node ('' as device) and per device of its last births: the timestamp of the
-- birth (ms since the epoch, as the edge node sent it) and whether a death followed it. An edge
-- node offline is offline with all its devices.
CREATE TABLE telemetry.sparkplug_devices (
    node        text NOT NULL REFERENCES telemetry.sparkplug_nodes (node),
    device      text NOT NULL,                   -- '' for the edge node itself
    born_ms     bigint,                          -- the birth's timestamp; NULL if it had none
    online      boolean NOT NULL,
    PRIMARY KEY (node, device)
);

-- What the births before this migration defined is online, at an unknown time.
INSERT INTO telemetry.sparkplug_devices (node, device, born_ms, online)
SELECT DISTINCT node, device, NULL::bigint, true FROM telemetry.sparkplug_metrics
UNION
SELECT node, '', NULL, true FROM telemetry.sparkplug_nodes;

CREATE FUNCTION telemetry.sparkplug_check(nodes text[], versions bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    absent integer;
    claimed integer;
    changed text;
BEGIN
    -- Nodes the flush found absent (version NULL) are claimed with a row of their own, so that
    -- a concurrent first birth of the same node waits here and then fails.
    SELECT count(*) INTO absent FROM unnest(versions) AS v WHERE v IS NULL;
    WITH ins AS (
        INSERT INTO telemetry.sparkplug_nodes (node, birth_id)
        SELECT e.node, 0 FROM unnest(nodes, versions) AS e(node, version)
         WHERE e.version IS NULL ORDER BY e.node
        ON CONFLICT (node) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO claimed FROM ins;
    PERFORM 1 FROM telemetry.sparkplug_nodes WHERE node = ANY (nodes) ORDER BY node FOR UPDATE;
    SELECT e.node INTO changed
      FROM unnest(nodes, versions) AS e(node, version)
      LEFT JOIN telemetry.sparkplug_nodes n USING (node)
     WHERE e.version IS NOT NULL AND n.birth_id IS DISTINCT FROM e.version
     LIMIT 1;
    IF claimed < absent THEN
        changed := 'first born elsewhere';
    END IF;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'Sparkplug edge node state changed since the flush read it (%)', changed
              USING ERRCODE = 'serialization_failure';
    END IF;
END
$$;

REVOKE ALL ON FUNCTION telemetry.sparkplug_check(text[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION telemetry.sparkplug_check(text[], bigint[]) TO ingest;
GRANT SELECT, INSERT, UPDATE, DELETE ON telemetry.sparkplug_devices TO ingest;
GRANT SELECT ON telemetry.sparkplug_devices TO analyst;
