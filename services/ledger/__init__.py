"""tokenforge ledger service."""
