"""Sightline common package."""
