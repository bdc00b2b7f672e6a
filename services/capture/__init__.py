"""Sightline capture package."""
