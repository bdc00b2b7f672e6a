"""Entry point: ``python -m sightline.embedding``."""

from sightline.embedding.service import main

main()
