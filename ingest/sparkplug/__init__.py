"""Sparkplug B 3.0: topics, the payload decoder, births, aliases and deaths."""
