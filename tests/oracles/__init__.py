"""Test oracles: the official Qwen3 recipes and tiny random Qwen3 models (never the runtime path)."""
