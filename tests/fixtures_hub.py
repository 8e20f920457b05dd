"""Test Hub server fixtures (placeholder)."""
