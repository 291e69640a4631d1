"""The zroact benchmark: simulated GPUs, the zero-overhead bound, and the seed pipeline."""
