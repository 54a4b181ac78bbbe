"""Building blocks both model families share."""
