"""Small helpers with no dependencies on other medsynth layers."""
