"""Sightline: face recognition as event-driven microservices (capture, detection, embedding, matching, decision)."""

__version__ = "0.1.0"
