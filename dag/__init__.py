"""Multi-step task types (Ray DAGs), utility task types, and the batch entry point."""
