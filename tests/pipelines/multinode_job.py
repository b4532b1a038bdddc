"""The annotate job on a three-node Ray cluster started on this machine (ray.cluster_utils.Cluster).

Run in its own process by tests/pipelines/test_multinode.py (a test session may already hold a local
Ray instance). Custom resources stand in for GPU nodes: `vesl_caption` exists only on the captioner
node (which holds the captioner and the fusion LLM, as one GPU node would) and `vesl_detect` only on
the detector node, the way `num_gpus` would pin the model pools to GPU
workers; the head node takes reads, decodes, phrases and writes. Prints one JSON line: the run's
manifest counts, the node each actor ran on, and the nodes' ids.

    python -m tests.pipelines.multinode_job MANIFEST OUTPUT
"""

from __future__ import annotations

import json
import sys


def main(manifest: str, output: str) -> int:
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from vesl.annotate.config import load_config
    from vesl.annotate.job import run_annotate

    mib = 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"vesl_cpu": 8}, "object_store_memory": 300 * mib, "include_dashboard": False})
    caption_node = cluster.add_node(num_cpus=1, resources={"vesl_caption": 2}, object_store_memory=150 * mib)
    detect_node = cluster.add_node(num_cpus=1, resources={"vesl_detect": 1}, object_store_memory=150 * mib)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        config = load_config(preset_name="tiny", overrides=[
            # every actor pool is pinned: an unpinned one may take the CPU a pinned one needs
            "ray.pools.caption={size: 1, num_cpus: 0.5, resources: {vesl_caption: 1}}",
            "ray.pools.fuse={size: 1, num_cpus: 0.5, resources: {vesl_caption: 1}}",
            "ray.pools.detect={size: 1, num_cpus: 1, resources: {vesl_detect: 1}}",
            "ray.pools.phrases={size: 1, num_cpus: 0.5, resources: {vesl_cpu: 1}}",
            "ray.pools.decode.num_cpus=0.5", "input.block_rows=4", "decode.batch_size=4"])
        result = run_annotate(manifest, output, config)
        placement: dict[str, list[str]] = {}
        for actor in state.actors().values():
            name = actor.get("ActorClassName") or ""
            for stage in ("CaptionImages", "FuseCaptions", "ExtractPhrases", "DetectRegions"):
                if stage in name:
                    placement.setdefault(stage, []).append(actor["Address"]["NodeID"])
        print(json.dumps({
            "counts": result["counts"], "placement": placement, "node_count": len(nodes),
            "head": cluster.head_node.node_id, "caption_node": caption_node.node_id,
            "detect_node": detect_node.node_id, "pools": result["resources"]["pools"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
