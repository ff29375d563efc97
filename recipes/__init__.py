"""cascade's entry points (thin: config -> library). Importing one imports megatron-core, which warns at import
time for every optional accelerator it lacks; the model builder logs the one fact that matters (Transformer Engine
spec or local spec), so the entry points mute those repeats before any import reaches megatron."""

from nemo_plugins.logs import mute_megatron_import_warnings

mute_megatron_import_warnings()
