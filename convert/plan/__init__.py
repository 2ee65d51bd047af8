"""Conversion plans, pure functions of metadata: pieces (read -> compute -> write) for base weights and adapters, expert-group detection, the transforms a piece applies."""
