"""`uniopd serve-teacher`: a teacher model behind an HTTP API that remote teacher clients speak."""
