"""The jobs: `annotate` (inputs -> region-text shards) and `train` (shards -> a CLOC checkpoint). Each
has its argument parser and `main`; `pipelines/` holds their Ray job entrypoint scripts and
`vesl.cli` dispatches `vesl annotate` / `vesl train` to them."""
