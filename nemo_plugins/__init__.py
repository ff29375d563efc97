"""cascade's library: Mistral-family models on megatron-core, conversion, pruning, distillation.

Importing it changes nothing global: entry points install the CPU compat (``cpu_compat.install()``) and the
warning filters (``logs.setup_logging()``) themselves.
"""
