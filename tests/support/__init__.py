"""What the tests and the benchmarks run against: servers, clients, processes and data.

- `stack`: the local stack's addresses (deploy/local/stack env) and the checkout's root;
- `net`: free ports, HTTP GETs of /metrics and /healthz, a TCP proxy that closes late;
- `process`: child processes (their output kept, stopped with a grace period), commands;
- `cluster`: the database: scratch databases in the stack's cluster with their roles' URLs,
  and private PostgreSQL+TimescaleDB clusters a test may restart;
- `broker`: private Mosquitto brokers; `fake_broker`: a scripted one for what Mosquitto
  will not do; `certs`: a test CA and server certificates;
- `mqtt`: the tests' own MQTT peer (paho): the publisher, session tools, a subscriber, and a
  collector of an `ingest.mqtt` source's messages;
- `ingester`: `ingest run` (or `drain`) as a child process, its settings and its metrics;
- `streams`: wire-format payloads and streams with the rows they must produce;
- `rows`: what the database holds: stored readings, dead letters, locks;
- `alerts`, `alert_receiver`: seeded alert history and a real HTTP receiver process;
- `sparkplug`: Sparkplug B payloads built from the official schema (upb);
- `tools`: the deploy folder's command-line tools (promtool).
"""


class SupportError(Exception):
    """A server, a process or a client of the tests did not do what it must; one readable line."""
