"""``python -m scheduler`` runs the proxy (same as ``mooncake-proxy``)."""
from scheduler.proxy.cli import main

raise SystemExit(main())
