"""Checkpoint and adapter formats on disk: safetensors header I/O (the one dtype table), checkpoint and adapter directory reading, config.json handling. Metadata only."""
