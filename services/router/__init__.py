"""tokenforge router service."""
