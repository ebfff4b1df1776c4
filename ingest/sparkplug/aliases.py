"""Sparkplug alias tables: alias -> (sensor id, datatype) per edge node, sorted for look-up."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["AliasTable"]

ALIAS, SENSOR, DATATYPE = 0, 1, 2  # rows of AliasTable.columns


@dataclass(frozen=True, slots=True)
class AliasTable:
    """One edge node's aliases, sorted by alias, immutable: a birth builds a new table.

    `columns` holds them as one int64 array of three rows (ALIAS: the alias's uint64 bits,
    sorted as int64; SENSOR; DATATYPE), so that a kernel takes the table as one argument."""

    columns: npt.NDArray[np.int64]

    @classmethod
    def build(
        cls,
        *,
        aliases: npt.NDArray[np.int64],
        sensors: npt.NDArray[np.int32],
        datatypes: npt.NDArray[np.int64],
    ) -> AliasTable:
        """A table from unsorted columns; of an alias given twice the last one wins."""
        order = np.argsort(aliases, kind="stable")
        a, s, d = aliases[order], sensors[order], datatypes[order]
        if len(a) > 1:
            last = np.ones(len(a), bool)
            last[:-1] = a[1:] != a[:-1]
            a, s, d = a[last], s[last], d[last]
        return cls(np.ascontiguousarray(np.stack([a, s, d]).astype(np.int64)))

    @classmethod
    def empty(cls) -> AliasTable:
        return cls(np.empty((3, 0), np.int64))

    @property
    def aliases(self) -> npt.NDArray[np.int64]:
        return self.columns[ALIAS, :]

    @property
    def sensors(self) -> npt.NDArray[np.int64]:
        return self.columns[SENSOR, :]

    @property
    def datatypes(self) -> npt.NDArray[np.int64]:
        return self.columns[DATATYPE, :]

    def __len__(self) -> int:
        return int(self.columns.shape[1])
