"""Sightline embedding package."""
