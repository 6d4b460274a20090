"""Where work runs: a small executor interface, one module per backend, and the run store."""
