"""A recording of exactly what the simulator published, and its reader."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import numpy as np
import numpy.typing as npt


class Recorder:
    """Writes exactly what was published: per message the topic and each channel's columns."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._enc = msgspec.msgpack.Encoder()

    def write(
        self, topic: str, channels: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64]]]
    ) -> None:
        frame = self._enc.encode(
            [
                topic,
                [
                    [name, t.astype("<i8").tobytes(), v.astype("<f8").tobytes()]
                    for name, t, v in channels
                ],
            ]
        )
        self._file.write(len(frame).to_bytes(4, "little") + frame)

    def close(self) -> None:
        self._file.close()


def read_record(
    path: str,
) -> Iterator[tuple[str, str, npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """(device path with prefix, sensor, times µs, values) for every channel a recording holds."""
    dec = msgspec.msgpack.Decoder()
    with open(path, "rb") as f:
        while header := f.read(4):
            topic, channels = dec.decode(f.read(int.from_bytes(header, "little")))
            for name, t, v in channels:
                yield topic, name, np.frombuffer(t, "<i8"), np.frombuffer(v, "<f8")
