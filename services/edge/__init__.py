"""tokenforge edge service."""
