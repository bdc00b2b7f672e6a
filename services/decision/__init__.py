"""Sightline decision package."""
