"""Consumers: ingest (file-closed → Rucio), and the services that run them on the broker."""
