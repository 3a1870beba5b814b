"""The reply table: what each model the build makes says to held-out prompts, scored."""
