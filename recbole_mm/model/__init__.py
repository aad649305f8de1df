"""recbole-mm models, one per module; see :data:`recbole_mm.utils.MODELS` for the registry."""
