"""tokenforge metering service."""
