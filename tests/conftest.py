"""Shared pytest configuration: Hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (default) keeps the whole suite inside the CI budget;
``HYPOTHESIS_PROFILE=long`` runs many more examples (see README, "Checks").
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile(
    "long", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=20_000, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
