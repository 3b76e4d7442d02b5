"""fit-up's own defaults, where they differ from the paper's (:class:`pipeline.training.loop.TrainConfig`, CLIP's
temperature in :class:`project.ContrastiveLoss`).

Kept apart from the fit loop, with no imports, so the command line can show them as its option defaults without
loading torch; the fit functions, sweeps, the demo and the studies read the same table (docs/training.md).
"""

# A short warm-up + cosine schedule that anneals where held-out recall peaks on small sets, and the latest epoch
# within one standard error of the lowest validation mean rank kept. fit-al and the other loops keep TrainConfig's.
FIT_UP_SCHEDULE = {"epochs": 10, "lr_schedule": "cosine", "select": "mean-rank-1se"}

# The initial value of the learnable temperature. On a few hundred pairs a run takes tens of AdamW steps, and the
# log-temperature moves by about the lr per step, so the temperature stays within about 1 % of where it starts
# (0.0701 -> 0.0694 over a 10-epoch run): the initial value is in effect the temperature. CLIP's 0.07 suits
# batches of 32k; on small sets a softer one retrieves better, for the UP and the linear head alike.
FIT_UP_TEMPERATURE = 0.1

# The rules that pick the kept epoch (TrainConfig.select; their wording in pipeline.training.loop.SELECTION_RULES),
# here so the command line offers the same names without loading torch.
SELECTIONS = ("mean-rank-1se", "mean-rank", "rsum")
