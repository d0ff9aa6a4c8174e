"""Operator registration and dispatch: one module per operator."""
