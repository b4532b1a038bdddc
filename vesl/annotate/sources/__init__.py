"""Inputs: what an input holds (plan), and its sources read into rows of INPUT_SCHEMA."""
