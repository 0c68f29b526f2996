"""Test oracles: the official Qwen3 recipes, written as the model cards publish them (never the runtime path;
not in the wheel). Imported as `oracles` (pytest puts tests/ on the path; benches add it)."""
