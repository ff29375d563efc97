"""cascade's library: Mistral-family models on megatron-core, conversion, pruning, distillation."""

import warnings

# megatron-core warns at import time for every optional accelerator it lacks; the model builder logs the
# one fact that matters (Transformer Engine spec or local spec), so these import-time repeats are muted.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
