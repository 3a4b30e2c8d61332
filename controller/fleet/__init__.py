"""The fleet services over the state store: what agents (agents.py) and operators (operators.py) may do.

Each method is one store transaction; controller.jobs decides, the store records.
"""
