"""The training guide's tables as data (../shared/reference/guide.md), shared by the presets, the
start-of-run report and the dataset linter. No imports: any part of the library may read these.
"""

# Minimum dataset per goal: (images, clips); None where the guide names clips only.
MINIMUM_SAMPLES: dict[str, tuple[int | None, int]] = {
    "character": (150, 30), "style": (None, 200), "motion": (None, 300), "domain": (None, 400),
}
# Learning-rate range per goal.
LR_RANGE: dict[str, tuple[float, float]] = {
    "character": (1e-4, 2e-4), "style": (8e-5, 1.5e-4), "motion": (5e-5, 1e-4), "domain": (8e-5, 1.2e-4),
}
# (lowest sample count, (low, high)) rows, largest first. The guide's rank table starts at 100 samples;
# below that we suggest 16-32.
RANK_BY_SIZE = [(800, (96, 128)), (400, (64, 96)), (200, (48, 64)), (100, (32, 48)), (0, (16, 32))]
EPOCHS_BY_SIZE = [(800, (8, 12)), (400, (10, 15)), (200, (12, 18)), (0, (15, 20))]


def row_for(table, samples: int):
    """The (low, high) range of the first row whose lowest sample count `samples` reaches."""
    return next(value for lowest, value in table if samples >= lowest)
# The guide's A/B test: "train 2-3 configurations and compare outputs" (learning rate, rank, epochs).
AB_TEST: dict[str, dict[str, float]] = {
    "conservative": {"learning_rate": 8e-5, "network_dim": 64, "max_train_epochs": 12},
    "standard": {"learning_rate": 1.2e-4, "network_dim": 64, "max_train_epochs": 15},
    "aggressive": {"learning_rate": 1.5e-4, "network_dim": 96, "max_train_epochs": 18},
}
