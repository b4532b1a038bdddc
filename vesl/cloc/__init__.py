"""The CLOC trainer: a CLIP with a Prompter (box -> region embedding), its losses, the shard reader,
the Ray Train loop, checkpoints and evaluation."""
