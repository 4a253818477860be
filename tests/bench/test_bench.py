"""alexnet.bench: a tiny run on the CPU writes every field; FLOP counts and peaks against hand computation.

Timings are not asserted (they depend on the machine); what is checked is that every
measurement, ratio, MFU and target is present and consistent with the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alexnet.bench.flops import GPU_PEAKS, cpu_peak, device_peak, gpu_peak_key, step_flops
from alexnet.cli import main
from alexnet.config import SpeedConfig
from alexnet.models.alexnet import create_model
from alexnet.train.step import resolve_options


def test_tiny_bench_writes_all_fields(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench", "--images", "12", "--source-size", "80x60", "--image-size", "72", "--crop-size", "64",
        "--batch-size", "4", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--workers", "0",
        "--store", str(tmp_path / "store"), "--json", str(out), "--no-progress", "--towers", "--repeats", "2", "--min-window", "0",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = {
        "ours_data", "ours_step", "ours_end_to_end", "ours_step_towers_split", "ours_step_torchvision_arch",
        "reference_data", "reference_step", "reference_end_to_end",
    }  # fmt: skip
    assert set(result["results"]) == expected
    for key, m in result["results"].items():
        assert m["images_per_s"] > 0 and m["images"] == 4 * 2 and m["seconds"] > 0, key  # 2 windows of 1 step
        assert len(m["windows_images_per_s"]) == 2 and m["spread"] >= 0, key
        assert m["name"] in printed
    for key in ("ours_step", "ours_end_to_end", "reference_step", "reference_end_to_end"):
        m = result["results"][key]
        assert m["flops_per_image"] > 0 and m["peak_flops"] > 0 and "estimate" in m["peak_source"]
        assert m["mfu"] == pytest.approx(m["flops_per_image"] * m["images_per_s"] / m["peak_flops"])
    r = result["results"]
    assert result["ratios_to_reference"]["end_to_end"] == pytest.approx(
        r["ours_end_to_end"]["images_per_s"] / r["reference_end_to_end"]["images_per_s"]
    )
    assert [m["batch_size"] for m in result["model_step_by_batch_size"]] == [2, 4]
    assert result["prepare"]["images"] == 12 + 10 and result["prepare"]["images_per_s_per_worker"] > 0
    assert result["projected_paper_training_hours"] == pytest.approx(
        90 * 1_281_167 / r["ours_end_to_end"]["images_per_s"] / 3600
    )
    assert set(result["targets"]) >= {
        "end_to_end_at_least_10x_reference",
        "best_step_mfu_at_least_25pct",
        "end_to_end_within_15pct_of_step",
    }
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"]
    assert result["options"] == resolve_options(SpeedConfig(), torch.device("cpu")).as_dict()


def test_bench_json_holds_each_part_as_it_finishes(tmp_path: Path, monkeypatch) -> None:
    # The parts reported through on_part grow one by one, and a run that dies after the step
    # still leaves the data and step figures in the --json file.
    from alexnet.bench import run as run_mod

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("time limit")

    monkeypatch.setattr(run_mod, "_ours_end_to_end_arm", fail)
    out = tmp_path / "bench.json"
    args = [
        "bench", "--images", "12", "--source-size", "80x60", "--image-size", "72", "--crop-size", "64",
        "--batch-size", "4", "--steps", "1", "--warmup", "0", "--workers", "0", "--repeats", "1", "--min-window", "0",
        "--store", str(tmp_path / "store"), "--json", str(out), "--no-progress",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="time limit"):
        main(args)
    partial = json.loads(out.read_text())
    assert partial["partial"] is True
    assert set(partial["results"]) == {"ours_data", "reference_data", "ours_step", "reference_step"}


def test_flops_of_torchvision_alexnet_match_its_published_count() -> None:
    """torchvision lists 0.714 GMAC (1.43 GFLOPs) per 224x224 image forward; a training step is 3x that
    (backward: gradients of inputs and of weights), less conv1's input gradient, which is not needed."""
    model = create_model("torchvision")
    x, y = torch.randn(1, 3, 224, 224), torch.zeros(1, dtype=torch.long)
    flops = step_flops(model, x, y)
    forward = 2 * 0.714e9
    conv1_input_grad = 2 * 64 * 55 * 55 * 3 * 11 * 11
    assert flops == pytest.approx(3 * forward - conv1_input_grad, rel=0.01)


def test_paper_net_flops_count_grouped_convolutions_per_tower() -> None:
    model = create_model("paper")
    x, y = torch.randn(1, 3, 224, 224), torch.zeros(1, dtype=torch.long)
    # Forward multiply-adds per layer: out_h * out_w * out_channels * in_channels_per_group * k * k.
    macs = (
        55 * 55 * 96 * 3 * 11 * 11
        + 27 * 27 * 256 * 48 * 5 * 5
        + 13 * 13 * 384 * 256 * 3 * 3
        + 13 * 13 * 384 * 192 * 3 * 3
        + 13 * 13 * 256 * 192 * 3 * 3
        + 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    )  # fmt: skip
    conv1_input_grad = 55 * 55 * 96 * 3 * 11 * 11
    assert step_flops(model, x, y) == 2 * (3 * macs - conv1_input_grad)


def test_torch_alone_overcounts_grouped_weight_gradients() -> None:
    """The reason for bench's own convolution-backward formula; if torch fixes its count, both agree."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    forward = 2 * 25 * 8 * 4 * 9
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    torch_backward = counter.get_total_flops() - forward
    # bench counts a step on data, so there is no input gradient: forward + weight gradient.
    ours = step_flops(torch.nn.Sequential(conv, torch.nn.Flatten()), x.detach(), torch.zeros(1, dtype=torch.long))
    assert ours == forward + forward
    assert torch_backward in (2 * forward, 3 * forward)  # 3x: weight gradient counted as ungrouped


def test_gpu_peak_table_lookup() -> None:
    assert gpu_peak_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_peak_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_peak_key("NVIDIA H100 NVL") == "H100 NVL"
    assert gpu_peak_key("NVIDIA H200") == "H200"
    assert gpu_peak_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_peak_key("Tesla T4") is None
    assert GPU_PEAKS["H100 SXM"]["bf16"] == 989.4e12


def test_cpu_peak_is_an_estimate_and_bf16_is_not_below_fp32() -> None:
    fp32, source = cpu_peak("fp32")
    bf16, _ = cpu_peak("bf16")
    assert fp32 > 1e9 and bf16 >= fp32 and source.startswith("estimate")
    peak, source = device_peak(torch.device("cpu"), "fp32", 2.5)
    assert peak == 2.5e12 and "--peak-tflops" in source


def test_bench_refuses_a_store_as_source(tmp_path: Path, capsys) -> None:
    (tmp_path / "store.json").write_text("{}")
    assert main(["bench", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "give the store with --store" in capsys.readouterr().err
    (tmp_path / "ilsvrc").mkdir()
    assert main(["bench", "--data", str(tmp_path / "ilsvrc"), "--no-progress"]) == 2
    assert "reads an ImageFolder tree" in capsys.readouterr().err
    assert main(["bench", "--set", "optim.lr=0.1"]) == 2
    assert main(["bench", "--source-size", "500"]) == 2


def test_the_bench_cache_store_of_an_older_version_is_prepared_again(tmp_path):
    from alexnet.bench.run import _drop_stale_cache
    from alexnet.data.store import VERSION

    old, current = tmp_path / "old.store256", tmp_path / "new.store256"
    for path, version in ((old, 1), (current, VERSION)):
        path.mkdir()
        (path / "store.json").write_text(json.dumps({"version": version}))
    _drop_stale_cache(old)
    _drop_stale_cache(current)
    assert not old.exists() and (current / "store.json").is_file()
