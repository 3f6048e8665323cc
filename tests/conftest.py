"""Shared test set-up. The nats_server / nats_url fixtures come from trionats.testing."""
