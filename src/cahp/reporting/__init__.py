"""Results: JSON reports, markdown tables and plots (they read results, never recompute them)."""
