"""Baselines verified by the same tree machinery as FIRP: prompt lookup and Medusa."""
