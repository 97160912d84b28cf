"""ml_collections configs: `mmi_13b` (the released model and recipe, the schema of every
setting), `tiny` (its architecture at tiny widths, for tests) and `demo` (the main job)."""
