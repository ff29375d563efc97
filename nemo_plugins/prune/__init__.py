"""Algorithm 2 of the Ministral 3 report: prune layers, hidden size (one PCA rotation) and SwiGLU channels.

Each step is a pure function of (config, Hugging Face-layout state, calibration statistics, target) that
returns a new (config, state) plus a report, so it is testable without training or megatron.
"""
