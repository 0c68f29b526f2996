"""The bottom of the house: settings, errors and progress reporting; it imports no station above it."""
