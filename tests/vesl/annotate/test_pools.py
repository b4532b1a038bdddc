from vesl.annotate.config import load_config
from vesl.annotate.pools import gpu_plan, plan_pools


def actor_pools(pools):
    return {name: p for name, p in pools.items() if p.actor}


def test_two_cpus_leave_one_for_tasks_and_never_ask_for_gpus():
    pools = actor_pools(plan_pools(2, 0, load_config()))
    assert sum(p.num_cpus * p.size for p in pools.values()) <= 1.0 + 1e-6
    assert all(p.num_gpus == 0 and p.size == 1 for p in pools.values())


def test_big_cpu_cluster_gets_several_actors_per_stage():
    pools = actor_pools(plan_pools(32, 0, load_config()))
    assert set(pools) == {"caption", "fuse", "phrases", "detect"}
    assert all(p.size == 6 and p.num_cpus == 1.0 for p in pools.values())
    assert sum(p.num_cpus * p.size for p in pools.values()) <= 32 - 8


def test_decode_runs_as_tasks_of_one_cpu_unless_configured():
    assert plan_pools(32, 0, load_config())["decode"].actor is False
    assert plan_pools(32, 0, load_config())["decode"].num_cpus == 1.0
    pools = plan_pools(32, 0, load_config(overrides=["ray.pools.decode.num_cpus=0.5", "ray.pools.decode.size=3"]))
    assert (pools["decode"].num_cpus, pools["decode"].size) == (0.5, 3)


def test_one_gpu_is_shared_by_the_model_stages():
    pools = plan_pools(16, 1, load_config())
    assert pools["caption"].num_gpus == pools["fuse"].num_gpus == pools["detect"].num_gpus == 1 / 3
    assert pools["phrases"].num_gpus == 0
    pools = plan_pools(16, 1, load_config(overrides=["fuse.enabled=false"]))
    assert "fuse" not in pools and pools["caption"].num_gpus == pools["detect"].num_gpus == 0.5


def test_many_gpus_split_between_the_model_pools():
    pools = plan_pools(64, 8, load_config(overrides=["fuse.enabled=false"]))
    assert (pools["detect"].size, pools["caption"].size) == (4, 4)
    assert pools["detect"].num_gpus == pools["caption"].num_gpus == 1.0
    assert gpu_plan(["caption", "detect"], 3) == {"caption": (2, 1.0), "detect": (1, 1.0)}


def test_gpus_are_ignored_when_the_run_is_cpu_only():
    pools = plan_pools(16, 4, load_config(), use_gpu=False)
    assert all(p.num_gpus == 0 for p in pools.values())


def test_a_stage_pinned_to_the_cpu_leaves_the_gpus_to_the_others():
    pools = plan_pools(16, 1, load_config(overrides=["caption.device=cpu", "fuse.device=cpu"]))
    assert pools["caption"].num_gpus == pools["fuse"].num_gpus == 0 and pools["detect"].num_gpus == 1.0
    assert plan_pools(16, 1, load_config(overrides=["caption.mode=alt_text", "fuse.enabled=false"]))[
        "caption"].num_gpus == 0  # no model, no GPU


def test_explicit_pool_settings_win():
    config = load_config(overrides=["ray.pools.detect={size: 3, num_cpus: 2, num_gpus: 0.25}"])
    pools = plan_pools(16, 1, config)
    assert (pools["detect"].size, pools["detect"].num_cpus, pools["detect"].num_gpus) == (3, 2, 0.25)


def test_custom_resources_pass_through_to_the_pool():
    config = load_config(overrides=["ray.pools.detect={size: 2, num_gpus: 1, resources: {h100: 1}}"])
    pools = plan_pools(8, 0, config)
    assert pools["detect"].resources == {"h100": 1.0} and pools["detect"].num_gpus == 1
    assert pools["caption"].resources == {}
