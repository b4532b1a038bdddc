"""`vesl export`: region-text shards as the files other trainers read (ODVG, GRIT, COCO, LLaVA-style
grounding conversations, HF datasets), one output part per shard, on Ray Data."""
