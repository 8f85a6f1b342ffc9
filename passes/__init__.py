"""Graph passes: analysis (tagging only) and one rewrite pass per file, run by the runner."""
