"""Head scoring. For now: the class-separability profiles used by CAHP."""

from cahp.scoring.separability import (
    bhattacharyya_distance,
    class_pairs,
    jeffries_matusita_distance,
    separability_profiles,
)

__all__ = ["bhattacharyya_distance", "class_pairs", "jeffries_matusita_distance", "separability_profiles"]
