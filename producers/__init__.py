"""DAQ side: publish file-closed events (library and CLI)."""
