"""`ingest assets import FILE`: asset metadata (type, criticality, team, description, CI id).

A YAML file holds a list of mappings (or a mapping `assets:` to that list); a CSV file has a
header row naming the columns. Every row names a `path` (an asset path such as `plant1/press-
shop` or a device path) and any of the other fields. The whole file is checked before anything
is written, and written in one transaction: importing the same file twice changes nothing.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from ingest.errors import IngestError

FIELDS = ("path", "type", "criticality", "team", "description", "ci_id")
_LEVEL = r"[A-Za-z0-9_.:-]{1,64}"
_PATH = re.compile(rf"{_LEVEL}(/{_LEVEL})*")

_UPSERT = """
INSERT INTO telemetry.asset_meta AS m (path, type, criticality, team, description, ci_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (path) DO UPDATE SET type = excluded.type, criticality = excluded.criticality,
    team = excluded.team, description = excluded.description, ci_id = excluded.ci_id,
    updated_at = now()
 WHERE (m.type, m.criticality, m.team, m.description, m.ci_id)
       IS DISTINCT FROM (excluded.type, excluded.criticality, excluded.team,
                         excluded.description, excluded.ci_id)
"""


@dataclass(frozen=True, slots=True)
class AssetMeta:
    """One row of a metadata file."""

    path: str
    type: str | None = None
    criticality: int | None = None
    team: str | None = None
    description: str | None = None
    ci_id: str | None = None


class AssetFileError(IngestError):
    """A metadata file is unreadable or has a bad row; the message names the file and line."""


def _row(raw: dict[str, Any], where: str) -> AssetMeta:
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise AssetFileError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    values: dict[str, Any] = {}
    for field in FIELDS:
        value = raw.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if field == "criticality":
            try:
                number = int(str(value).strip())
            except ValueError:
                raise AssetFileError(
                    f"{where}: criticality must be an integer from 1 to 5, got {value!r}"
                ) from None
            if not 1 <= number <= 5 or isinstance(value, bool | float):
                raise AssetFileError(
                    f"{where}: criticality must be an integer from 1 to 5, got {value!r}"
                )
            values[field] = number
        else:
            if not isinstance(value, str | int):
                raise AssetFileError(f"{where}: {field} must be text, got {value!r}")
            text = str(value).strip()
            if len(text) > 1000 or "\x00" in text:
                raise AssetFileError(f"{where}: {field} is longer than 1000 characters or has NUL")
            values[field] = text
    path = values.get("path")
    if path is None:
        raise AssetFileError(f"{where}: path is missing")
    path = path.strip("/")
    if not _PATH.fullmatch(path):
        raise AssetFileError(
            f"{where}: path {path!r} must be topic levels of 1-64 characters from "
            "A-Z a-z 0-9 _ . : - separated by /"
        )
    values["path"] = path
    return AssetMeta(**values)


def _yaml_rows(text: str, name: str) -> list[AssetMeta]:
    try:
        nodes = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise AssetFileError(f"{name}{at}: not valid YAML") from None
    if isinstance(doc, dict) and set(doc) == {"assets"}:
        doc = doc["assets"]
        nodes = nodes.value[0][1] if nodes is not None else None
    if not isinstance(doc, list):
        raise AssetFileError(f"{name}: expected a list of assets (or `assets:` holding one)")
    out = []
    for n, item in enumerate(doc):
        line = nodes.value[n].start_mark.line + 1 if nodes is not None else n + 1
        if not isinstance(item, dict):
            raise AssetFileError(f"{name}:{line}: expected a mapping with a path")
        out.append(_row(item, f"{name}:{line}"))
    return out


def _csv_rows(text: str, name: str) -> list[AssetMeta]:
    reader = csv.DictReader(io.StringIO(text))
    out = []
    for item in reader:
        line = reader.line_num
        if None in item:
            raise AssetFileError(f"{name}:{line}: more values than the header has columns")
        out.append(_row(dict(item), f"{name}:{line}"))
    return out


def read(path: str) -> list[AssetMeta]:
    """Every row of a YAML (.yaml, .yml) or CSV (.csv) file; AssetFileError naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AssetFileError(
            f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    rows = _csv_rows(text, path) if path.lower().endswith(".csv") else _yaml_rows(text, path)
    seen: dict[str, int] = {}
    for n, row in enumerate(rows):
        if row.path in seen:
            raise AssetFileError(
                f"{path}: path {row.path!r} appears twice (rows {seen[row.path] + 1} and {n + 1})"
            )
        seen[row.path] = n
    return rows


async def import_file(*, dsn: str, path: str) -> tuple[int, int]:
    """Upsert the file's rows; returns (rows in the file, rows that changed)."""
    rows = read(path)
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise IngestError(f"assets import: cannot connect to the database: {exc}") from None
    try:
        async with conn.transaction():
            status = await conn.execute(
                _UPSERT,
                [r.path for r in rows],
                [r.type for r in rows],
                [r.criticality for r in rows],
                [r.team for r in rows],
                [r.description for r in rows],
                [r.ci_id for r in rows],
            )
    except asyncpg.InsufficientPrivilegeError:
        raise IngestError(
            "assets import: writing telemetry.asset_meta needs the schema owner; give "
            "db.migrate_url (INGEST_MIGRATE_DB_URL)"
        ) from None
    except asyncpg.UndefinedTableError:
        raise IngestError(
            "assets import: telemetry.asset_meta does not exist; run 'ingest migrate'"
        ) from None
    finally:
        await conn.close()
    return len(rows), int(status.rsplit(" ", 1)[-1])
