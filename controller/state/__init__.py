"""The controller's state: model, store interface, SQLite and in-memory stores, transactions."""
