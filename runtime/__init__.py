"""Compressed models at run time: compressing checkpoints, loading them as transformers models, decoding units
just before the modules that use them run."""
