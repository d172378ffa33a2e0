"""Shared test helpers (servers the integration tests start themselves)."""
