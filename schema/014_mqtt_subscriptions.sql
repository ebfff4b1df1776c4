-- The topic filters each client id's broker session was subscribed to. An MQTT session keeps its
-- subscriptions across connections, and a client cannot ask the broker for them; so when the
-- configuration stops naming a filter (a new topic_prefix, share_group or Sparkplug groups),
-- the ingester finds it here, unsubscribes from it, and only then forgets it.

CREATE TABLE telemetry.mqtt_subscriptions (
    client_id     text NOT NULL,
    topic_filter  text NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, topic_filter)
);

GRANT SELECT, INSERT, DELETE ON telemetry.mqtt_subscriptions TO ingest;
GRANT SELECT ON telemetry.mqtt_subscriptions TO analyst;
