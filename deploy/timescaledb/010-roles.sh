#!/usr/bin/env bash
# Runs once, when the TimescaleDB container initialises an empty data volume (it is mounted
# into /docker-entrypoint-initdb.d beside the image's own scripts, which create the timescaledb
# extension in $POSTGRES_DB first).
#
# Creates the three roles with LOGIN and the passwords from the environment:
#   telemetry_owner  owns the database and runs `ingest migrate` (may create roles)
#   ingest           the service: inserts into the telemetry tables, nothing more
#   analyst          read-only (Grafana)
# The migrations create `ingest` and `analyst` NOLOGIN only when they are missing, and grant the
# privileges; they keep LOGIN and the passwords given here.
set -euo pipefail

for var in TELEMETRY_OWNER_PASSWORD TELEMETRY_INGEST_PASSWORD TELEMETRY_ANALYST_PASSWORD; do
    [ -n "${!var:-}" ] || { echo "010-roles.sh: $var is not set" >&2; exit 1; }
done

psql -X -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="$POSTGRES_DB" \
    -v owner_pw="$TELEMETRY_OWNER_PASSWORD" \
    -v ingest_pw="$TELEMETRY_INGEST_PASSWORD" \
    -v analyst_pw="$TELEMETRY_ANALYST_PASSWORD" <<'SQL'
CREATE ROLE telemetry_owner LOGIN CREATEROLE PASSWORD :'owner_pw';
CREATE ROLE ingest LOGIN PASSWORD :'ingest_pw';
CREATE ROLE analyst LOGIN PASSWORD :'analyst_pw';
ALTER DATABASE :"db" OWNER TO telemetry_owner;
SQL
