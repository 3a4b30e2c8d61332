"""The controller's HTTP API: one module per area, each with a route table."""
