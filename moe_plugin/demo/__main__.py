"""`python -m moe_plugin.demo`."""

from moe_plugin.demo.cli import main

raise SystemExit(main())
