"""Subprocess body of :class:`MooncakeCluster`: mount a store segment and keep it until killed.

Prints ``READY`` once the segment is registered with the master so the parent can go on.
"""
from __future__ import annotations

import json
import signal
import sys


def main() -> None:
    from mooncake.store import MooncakeDistributedStore

    cfg = json.loads(sys.argv[1])
    store = MooncakeDistributedStore()
    rc = store.setup(cfg["local_hostname"], cfg["metadata_server"], int(cfg["global_segment_size"]),
                     int(cfg["local_buffer_size"]), cfg["protocol"], cfg["device_name"],
                     cfg["master_server_address"])
    if rc != 0:
        print(f"FAILED setup rc={rc}", flush=True)
        sys.exit(1)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    store.close()


if __name__ == "__main__":
    main()
