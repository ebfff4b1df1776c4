"""Every numba kernel compiled, or loaded from the on-disk cache, before the first message.

The one place that knows all the kernels: message shapes, the flush's gather, order check and
rollups, the
anomaly filters, and (when Sparkplug is on) the Sparkplug decoder.
"""

from __future__ import annotations

from ingest import kernels, partials, rollup, shape_atlas, shape_layout
from ingest.anomaly import detector
from ingest.asset import model
from ingest.mqtt import framing
from ingest.sparkplug import stage

__all__ = ["warm_up"]


def warm_up(*, sparkplug: bool = True) -> None:
    """Run every kernel once on tiny input, so that no message waits for the JIT.

    Call once before subscribing. Blocks for up to a few seconds on a cold cache, well under one
    on a warm one.
    """
    kernels.compile_kernels()
    rollup.compile_kernels()
    shape_layout.compile_kernels()
    shape_atlas.compile_kernels()
    framing.compile_kernels()
    partials.compile_kernels()
    detector.compile_kernels()
    model.compile_kernels()
    if sparkplug:
        stage.compile_kernels()
