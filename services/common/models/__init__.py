"""Sightline common models package."""
