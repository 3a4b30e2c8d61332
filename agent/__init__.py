"""sledge-agent: writes images to disks and runs jobs from the controller (docs/agent.md)."""

# The version's one source: pyproject.toml reads it from here (setuptools' dynamic version), and
# the live image, which ships agent/ without package metadata, carries it with the code.
__version__ = "0.1.0"
