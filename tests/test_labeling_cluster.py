"""Where the model actors run and how many there are: no silent CPU (an actor given a GPU it cannot
use stops the run in one sentence; real models never go to CPUs unasked; a cluster without GPUs is
waited on when GPUs can come, else refused), and the pool that grows and shrinks with the cluster."""

import pytest
import torch

from labeling.pipeline import cluster, environment
from labeling.pipeline.predictors import GPUUnavailable, ModelPredictor


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.count(". ") == 0


def test_an_actor_given_a_gpu_without_cuda_fails_at_start_naming_driver_and_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU is off the bus, or the driver too old
    monkeypatch.setattr(environment, "_nvidia_driver", lambda: "470.57.02")
    with pytest.raises(GPUUnavailable) as err:
        ModelPredictor(choice=None, device="cuda")  # fails before touching a model
    message = str(err.value)
    assert one_sentence(message)
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    assert "NVIDIA driver 470.57.02" in message and f"torch {torch.__version__} {build}" in message
    assert "--device cpu" in message

    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch on a GPU node (nothing imported after)
    monkeypatch.setattr(environment, "_nvidia_driver", lambda: None)
    message = environment.no_cuda_sentence()
    assert one_sentence(message) and "built without CUDA" in message and "no NVIDIA driver readable" in message


def test_the_actors_sentence_reaches_the_driver_through_rays_error():
    sentence = environment.no_cuda_sentence()
    # How Ray reports an actor whose constructor raised: its traceback as text, under its own first line.
    ray_text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...).__init__() "
                "(pid=1, ip=10.0.0.2)\n  File \"predictors.py\", line 93, in _device\n"
                f"labeling.pipeline.predictors.GPUUnavailable: {sentence}\n")
    wrapped = RuntimeError("the dataset failed")
    wrapped.__cause__ = RuntimeError(ray_text)
    assert cluster.actor_start_failure(wrapped) == sentence
    assert cluster.actor_start_failure(RuntimeError("disk full")) is None


def fixed_cluster(monkeypatch, cpus: float, gpus: float, autoscaler: bool = False):
    monkeypatch.setattr(cluster, "cluster_cpus_gpus", lambda: (cpus, gpus))
    monkeypatch.setattr(cluster, "can_add_gpus", lambda: autoscaler)


def test_a_fixed_cluster_without_gpus_is_refused_unless_cpus_are_asked_for(monkeypatch):
    fixed_cluster(monkeypatch, cpus=8, gpus=0)
    with pytest.raises(cluster.ClusterError) as err:  # real models, no --device: never CPUs
        cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=None, log=print)
    assert one_sentence(str(err.value)) and "--device cpu" in str(err.value) and "add GPU nodes" in str(err.value)
    with pytest.raises(cluster.ClusterError):  # the tiny twins too, when GPUs are asked for
        cluster.plan_actors("cuda", cpu_allowed=True, wait_for_gpus_s=None, log=print)
    asked = cluster.plan_actors("cpu", cpu_allowed=False, wait_for_gpus_s=None, log=print)
    assert (asked.device, asked.gpus_per_actor, asked.model_actors) == ("cpu", 0.0, 8)
    tiny = cluster.plan_actors("auto", cpu_allowed=True, wait_for_gpus_s=None, log=print)
    assert tiny.device == "cpu"
    fixed_cluster(monkeypatch, cpus=8, gpus=2)  # GPUs present: the tiny twins use them too
    assert cluster.plan_actors("auto", cpu_allowed=True, wait_for_gpus_s=None, log=print).device == "cuda"
    assert cluster.plan_actors("cpu", cpu_allowed=True, wait_for_gpus_s=None, log=print).device == "cpu"
    with pytest.raises(cluster.ClusterError, match="--device cpu"):
        cluster.plan_layout(8, 2, gpus_per_actor=0, device="cuda")


def test_a_cluster_that_can_add_gpus_is_waited_on_with_a_message(monkeypatch):
    import ray.autoscaler.sdk

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    seen = iter([(4, 0), (4, 0), (12, 1), (12, 1)])  # a GPU node joins on the third look
    monkeypatch.setattr(cluster, "cluster_cpus_gpus", lambda: next(seen))
    monkeypatch.setattr(cluster, "can_add_gpus", lambda: True)
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    lines = []
    layout = cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=None, log=lines.append)
    assert layout.device == "cuda" and layout.model_actors == 2 and layout.gpus_per_actor == 0.5
    assert "waiting up to 1800 s for the first GPU" in lines[0] and "1 GPUs joined" in lines[1]
    assert requests == [[{"GPU": 1.0, "CPU": 1.0}], []]  # asked the autoscaler for a GPU, then withdrew

    fixed_cluster(monkeypatch, cpus=4, gpus=0, autoscaler=False)  # a fixed cluster, told GPUs are coming
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(cluster.time, "monotonic", lambda: next(clock))
    with pytest.raises(cluster.ClusterError) as err:
        cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=20, log=lines.append)
    assert one_sentence(str(err.value)) and "within 20 s" in str(err.value) and "--device cpu" in str(err.value)


def test_the_model_actor_pool_grows_with_the_cluster_between_a_minimum_and_a_maximum():
    elastic = cluster.plan_layout(cpus=64, gpus=8)
    assert (elastic.model_actors, elastic.min_actors, elastic.max_actors) == (8, 1, None)
    pool = elastic.pool()
    assert (pool.min_size, pool.max_size, pool.initial_size) == (1, float("inf"), 8)
    capped = cluster.plan_layout(cpus=64, gpus=8, min_actors=2, max_actors=4)
    assert (capped.model_actors, capped.min_actors, capped.max_actors) == (4, 2, 4)
    grows = cluster.plan_layout(cpus=64, gpus=2, max_actors=16)  # starts on what is there, grows to 16
    assert (grows.model_actors, grows.max_actors) == (2, 16)
    fixed = cluster.plan_layout(cpus=64, gpus=8, model_actors=3).pool()
    assert fixed.min_size == fixed.max_size == 3
    assert "growing with the cluster" in elastic.describe() and "growing" not in cluster.plan_layout(
        cpus=64, gpus=8, model_actors=3).describe()


def test_stats_report_billed_gpu_time_beside_model_time(monkeypatch):
    import ray
    import ray._private.state

    from dataset_card.contract import layout
    from labeling.pipeline import finish

    hour = 3600.0
    table = {  # Ray's actor table (times in ms): two model actors of this job, one of another job, one other class
        "a": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))", "StartTime": hour * 500,
              "EndTime": 2.5 * hour * 1000},
        "b": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))",
              "StartTime": hour * 1000, "EndTime": 0},  # still alive: counted up to now
        "c": {"JobID": "02000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))", "StartTime": 0,
              "EndTime": 9 * hour * 1000},
        "d": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(read_stage))", "StartTime": 0,
              "EndTime": 9 * hour * 1000},
    }
    monkeypatch.setattr(ray._private.state, "actors", lambda: table)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"get_job_id": lambda self: "01000000"})())
    lifetime = cluster.model_actor_seconds(now_s=4 * hour)  # a pending actor (no start time) holds nothing
    assert lifetime == 2 * hour + 3 * hour

    # 5 actor-hours at half a GPU each held 2.5 GPU-hours; the models computed for 0.5 of them.
    stats = finish.run_stats(layout.ShardStats(shard=-1), 10, [], wall_time_s=10.0, commit_time_s=0.0,
                             gpus_per_actor=0.5, actor_lifetime_s=lifetime)
    assert (stats["gpu_hours"], stats["billed_gpu_hours"]) == (0.0, 2.5)
    assert finish.gpu_time(model_s=hour, gpus_per_actor=0.5, actor_lifetime_s=lifetime) == {
        "gpu_hours": 0.5, "billed_gpu_hours": 2.5}
    assert finish.gpu_time(hour, 1.0, None)["billed_gpu_hours"] is None  # Ray could not say: unknown, not zero
    again = finish.run_stats(layout.ShardStats(shard=-1), 10, [], 10.0, 0.0, 0.5, previous=stats)
    assert again["previous_runs"][-1]["billed_gpu_hours"] == 2.5
