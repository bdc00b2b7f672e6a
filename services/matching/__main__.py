"""Entry point: ``python -m sightline.matching``."""

from sightline.matching.service import main

main()
