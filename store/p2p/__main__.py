"""``python -m store.p2p``: the ``mooncake-p2p`` command."""
import sys

from store.p2p.cli import main

sys.exit(main())
