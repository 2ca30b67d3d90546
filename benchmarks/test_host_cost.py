"""The host-cost benchmark runs on the CPU and measures the GPU launch path up to the launch."""

from benchmarks import host_cost


def test_host_cost_measures_the_launch_path() -> None:
    figures = host_cost.measure(calls=200, repeats=2)
    assert figures["launches_per_call"] == 1.0  # the kernel launch was reached, once per call
    for key in ("fused_module_us", "fused_function_us", "fused_module_train_us", "eager_adapter_us", "linear_us"):
        assert 0 < figures[key] < 10_000, key
    # Timings are not compared here (a loaded CI machine makes them noise); that a module call skips
    # validation and the dispatcher is tested in tests/test_layer.py.
