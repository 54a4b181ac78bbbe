"""Building blocks the model families share."""
