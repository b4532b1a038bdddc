"""The core layer: what every other layer stands on and that knows nothing of stages or jobs.

settings (the config base), storage (fsspec URIs and credentials), shards (finding region-text
files), models (Hugging Face loading), serving (OpenAI-compatible inference servers), images (fetch and
decode), text (error and text hygiene), ray (joining or starting Ray). Imports only `vesl.errors` and
`schemas` from the project.
"""
