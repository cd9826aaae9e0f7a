"""Engines: the torch reference engine and the Megatron-Core engine behind one protocol."""
