"""Accounting: the events the model counts and the cost table that prices them."""
