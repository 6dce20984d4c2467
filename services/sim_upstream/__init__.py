"""tokenforge sim_upstream service."""
