"""Tools over the library: the benchmark suite and the environment check."""
