"""Sightline detection package."""
