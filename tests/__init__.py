"""Test suite of moe_plugin (a package, so spawned test workers can be pickled)."""
