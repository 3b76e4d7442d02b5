"""fit-up's own defaults, where they differ from :class:`pipeline.training.loop.TrainConfig`'s (the paper's).

Kept apart from the fit loop, with no imports, so the command line can show them as its option defaults without
loading torch; the fit functions, sweeps, the demo and the studies read the same table (docs/training.md).
"""

# A short warm-up + cosine schedule that anneals where held-out recall peaks on small sets, and mean-rank
# selection. fit-al and the other loops keep TrainConfig's.
FIT_UP_SCHEDULE = {"epochs": 10, "lr_schedule": "cosine", "select": "mean-rank"}
