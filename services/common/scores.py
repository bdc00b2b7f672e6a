"""What a comparison score means: the mapping between descriptor distance and the similarity users see.

The descriptor network is dlib's ResNet, whose published same-person rule is Euclidean distance < 0.6. Similarity is
a linear rescaling of distance to [0, 1] that puts that rule at 0.5; it is monotonic, so thresholds may be given in
either unit. (A calibrated false-match-rate table is a later addition: see docs/roadmap.md.)
"""

from __future__ import annotations

DEFAULT_MAX_DISTANCE = 0.6
_DISTANCE_AT_ZERO_SIMILARITY = 2 * DEFAULT_MAX_DISTANCE


def similarity(distance: float) -> float:
    """1.0 for identical descriptors, 0.5 at dlib's threshold, 0.0 at twice that distance or more."""
    return max(0.0, min(1.0, 1.0 - distance / _DISTANCE_AT_ZERO_SIMILARITY))


def distance_for_similarity(value: float) -> float:
    return (1.0 - value) * _DISTANCE_AT_ZERO_SIMILARITY
