"""Loading models and embedding images and texts (classifiers build on this)."""
