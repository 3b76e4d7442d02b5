"""Training: the fit loop and what every trainer shares, pairing, prefetching reads, run directories, presets, torchrun."""
