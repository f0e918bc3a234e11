"""Training, evaluation and export of the shipped models; see DESIGN 3.4."""
