"""The worker's heap and Python's garbage collector, set once a worker has started."""

from __future__ import annotations

import gc

# Measured on 2 cores at half of /recommend's saturation (410 req/s beside 1,700 events/s),
# with the default (700, 10, 10) after gc.freeze(): a full collection every ~3 s in each
# worker, 11-33 ms each (~45k objects not frozen: the in-flight requests' objects outlive two
# younger collections and are promoted), and some clusters of slow requests began with one.
# With (20_000, 20, 20): none in 80 s, and API CPU per /recommend unchanged (1.67-1.75
# against 1.73-1.77 ms, 2 alternating pairs).
GC_THRESHOLDS = (20_000, 20, 20)


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (frameworks, model, tables) out of the garbage
    collector's sight: otherwise each full collection walks it all, a 100-150 ms pause every
    few seconds under load that showed as the p99 of /recommend. Then collect less often
    (GC_THRESHOLDS): what is left to walk is mostly the requests in flight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
