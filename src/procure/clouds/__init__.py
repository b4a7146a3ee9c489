"""GPU clouds that rent instances by the hour: one folder per provider with its API client."""
