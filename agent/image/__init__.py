"""The image format shared by the importer (controller) and the writer (agent)."""
