"""Training / evaluation data: the built-in synthetic source and (later) manifest loaders."""
