"""Built-in plugins. Each module is one technique or workload, registered through the ``harness.plugins``
entry points exactly as a third party's would be (see setup.cfg)."""
