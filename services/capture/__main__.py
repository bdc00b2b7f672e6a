"""Entry point: ``python -m sightline.capture``."""

from sightline.capture.service import main

main()
