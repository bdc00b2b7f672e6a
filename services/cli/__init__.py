"""Sightline cli package."""
