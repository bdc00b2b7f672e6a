"""Sightline matching package."""
