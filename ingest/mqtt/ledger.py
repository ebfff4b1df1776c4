"""The ack ledger: which messages of one connection are handed out and not yet PUBACKed."""

from __future__ import annotations

import collections
import itertools


class AckLedger:
    """QoS 1 messages received on one connection, in arrival order, until PUBACKed.

    MQTT requires PUBACKs in the order the PUBLISHes arrived [MQTT-4.6.0-2]: an acknowledgement
    given early is held until every earlier message is acknowledged, then released with them.
    Never awaits; use it from the event loop's thread only.
    """

    __slots__ = ("_ahead", "_entries", "_head")

    def __init__(self) -> None:
        self._head = 0  # the sequence number of _entries[0]
        # [packet id, acknowledged] per message, in arrival order.
        self._entries: collections.deque[list[int]] = collections.deque()
        self._ahead = 0  # entries acknowledged while an earlier one is not

    def __len__(self) -> int:
        """Messages tracked and not yet PUBACKed."""
        return len(self._entries)

    @property
    def next_seq(self) -> int:
        """The sequence number the next message tracked gets."""
        return self._head + len(self._entries)

    def track(self, mid: int) -> int:
        """Record a message just received; returns its sequence number."""
        seq = self._head + len(self._entries)
        self._entries.append([mid, 0])
        return seq

    def track_many(self, mids: list[int]) -> int:
        """`track` for each of `mids`, in order; the sequence number of the first."""
        seq = self._head + len(self._entries)
        self._entries.extend([[mid, 0] for mid in mids])
        return seq

    def ack(self, seq: int) -> list[int] | None:
        """Acknowledge message `seq`: the packet ids now due a PUBACK, in order (often none:
        an earlier message is still open), or None if `seq` is unknown or already used."""
        entries = self._entries
        index = seq - self._head
        if not 0 <= index < len(entries) or entries[index][1]:
            return None
        entries[index][1] = 1
        released: list[int] = []
        if index == 0:
            while entries and entries[0][1]:
                released.append(entries.popleft()[0])
            self._head += len(released)
            self._ahead -= len(released) - 1
        else:
            self._ahead += 1
        return released

    def ack_many(self, seqs: list[int]) -> tuple[int, list[int]]:
        """`ack` for each of `seqs`, in order: how many were acknowledged (known and not used
        before), and the packet ids now due a PUBACK, in order."""
        entries, head, n = self._entries, self._head, len(seqs)
        if (
            n
            and seqs[0] == head
            and n <= len(entries)
            and seqs == list(range(head, head + n))
            and not (self._ahead and any(entry[1] for entry in itertools.islice(entries, n)))
        ):  # the usual case: the oldest messages, all at once
            popleft = entries.popleft
            released = [popleft()[0] for _ in range(n)]
            if self._ahead:
                while entries and entries[0][1]:
                    released.append(popleft()[0])
                    self._ahead -= 1
            self._head += len(released)
            return n, released
        done, released = 0, []
        for seq in seqs:
            got = self.ack(seq)
            if got is not None:
                done += 1
                released += got
        return done, released
