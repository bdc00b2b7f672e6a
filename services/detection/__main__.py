"""Entry point: ``python -m sightline.detection``."""

from sightline.detection.service import main

main()
