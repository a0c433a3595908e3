"""medsynth."""
