"""rucio-injector: event-driven ingestion of detector data into Rucio (shared core)."""

__version__ = "0.1.0"
