"""Throw-away real services for tests and the demo: a Rucio server from PyPI, ActiveMQ Classic."""
