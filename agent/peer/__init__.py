"""Agents share the chunks they verified: tickets, the have-bitmap, the peer server and source."""
