"""Pipeline stages. Each module: a pydantic config, a callable class over a columnar batch, and
pure functions for the logic worth testing alone. None of them needs Ray to run."""
