"""Image import, export and store upkeep: the `sledge image` commands."""
