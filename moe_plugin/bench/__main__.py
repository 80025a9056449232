"""`python -m moe_plugin.bench`."""

from moe_plugin.bench.cli import main

raise SystemExit(main())
