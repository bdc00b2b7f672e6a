"""Entry point: ``python -m sightline.decision``."""

from sightline.decision.service import main

main()
