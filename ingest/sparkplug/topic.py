"""Sparkplug B topics: `spBv1.0/<group>/<type>/<edge node>[/<device>]` and STATE."""

from __future__ import annotations

from typing import Final, NamedTuple

from ingest.errors import PayloadError

__all__ = ["NAMESPACE", "Topic", "is_sparkplug", "parse_topic"]

NAMESPACE: Final = "spBv1.0"
_PREFIX: Final = NAMESPACE + "/"  # checked for every message: built once
NODE_TYPES: Final = frozenset({"NBIRTH", "NDEATH", "NDATA"})
DEVICE_TYPES: Final = frozenset({"DBIRTH", "DDEATH", "DDATA"})
IGNORED_TYPES: Final = frozenset({"NCMD", "DCMD"})


class Topic(NamedTuple):
    """A Sparkplug message's topic; `kind` is None for STATE and commands (ignored)."""

    kind: str | None
    group: str
    edge: str
    device: str | None

    @property
    def node(self) -> str:
        return f"{self.group}/{self.edge}"

    @property
    def levels(self) -> tuple[str, ...]:
        """The device's levels in the registry: group, edge node and, for devices, the device."""
        if self.device is None:
            return (self.group, self.edge)
        return (self.group, self.edge, self.device)


def is_sparkplug(topic: str) -> bool:
    return topic.startswith(_PREFIX)


def parse_topic(topic: str) -> Topic:
    """Split a topic under `spBv1.0/`; raises PayloadError('topic: ...') when malformed."""
    parts = topic.split("/")
    if len(parts) >= 2 and parts[1] == "STATE":
        return Topic(None, "", "", None)
    if len(parts) not in (4, 5) or not all(parts[1:]):
        raise PayloadError(
            "topic: a Sparkplug topic is spBv1.0/<group>/<type>/<edge node>[/<device>]"
        )
    _, group, kind, edge, *rest = parts
    device = rest[0] if rest else None
    if kind in IGNORED_TYPES:
        return Topic(None, group, edge, device)
    if kind in NODE_TYPES and device is None:
        return Topic(kind, group, edge, None)
    if kind in DEVICE_TYPES and device is not None:
        return Topic(kind, group, edge, device)
    if kind in NODE_TYPES or kind in DEVICE_TYPES:
        raise PayloadError(f"topic: {kind} {'has no' if device is None else 'takes no'} device")
    raise PayloadError(f"topic: unknown Sparkplug message type {kind[:32]!r}")
