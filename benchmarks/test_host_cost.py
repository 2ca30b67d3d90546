"""The host-cost benchmark runs on the CPU and measures the GPU launch path up to the launch."""

from benchmarks import host_cost


def test_host_cost_measures_the_launch_path() -> None:
    figures = host_cost.measure(calls=200, repeats=2)
    assert figures["launches_per_call"] == 1.0  # the kernel launch was reached, once per call
    assert figures["bound"] is True  # the module's call went through its bound kernel launch
    for key in ("fused_module", "fused_module_unbound", "fused_function", "fused_module_train", "eager_adapter",
                "linear"):
        assert 0 < figures[f"{key}_us"] <= figures[f"{key}_median_us"] < 10_000, key
    target = figures["target"]
    assert target["target_us"] == host_cost.TARGET_US
    assert target["measured_us"] == figures["fused_module_us"]
    assert target["met"] == (figures["fused_module_us"] <= host_cost.TARGET_US)
    # Timings are not compared here (a loaded CI machine makes them noise); that a module call skips
    # validation and the dispatcher is tested in tests/test_layer.py.
