"""Fast checks of the hot-path choices made by config: AdamW kernel, device peak for MFU, the rank-0
writer, and the start-up/export timings the run summary prints (no Ray, no timing thresholds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from cluster.config import load_config
from jobs.config import TrainConfig
from jobs.deepspeed_config import (
    deepspeed_config,
    loop_clips_gradients,
    zero3_leaf_classes,
    zero3_whole_elements,
)
from jobs.metrics import (
    MetricsWriter,
    NullWriter,
    log_event,
    log_launch,
    peak_flops,
    read_metrics,
    startup_timings,
    summary_table,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_optimizer_kernel_follows_device_and_setting():
    params = lambda cfg: deepspeed_config(cfg, world_size=1)["optimizer"]["params"]  # noqa: E731
    assert params(TrainConfig())["torch_adam"] is True  # CPU: torch AdamW, no DeepSpeed op build
    gpu = params(TrainConfig(use_gpu=True))
    assert "torch_adam" not in gpu and "fused" not in gpu  # GPU auto: DeepSpeed FusedAdam
    fused = params(TrainConfig(use_gpu=True, optimizer_impl="torch_fused"))
    assert fused["torch_adam"] is True and fused["fused"] is True
    assert "torch_adam" not in params(TrainConfig(zero_stage=3, offload_optimizer=True))  # CPU Adam


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer_impl": "torch_fused"}, "torch_fused needs train.use_gpu true"),
        ({"optimizer_impl": "deepspeed_fused"}, "deepspeed_fused needs train.use_gpu true"),
        ({"optimizer_impl": "torch_fused", "use_gpu": True, "offload_optimizer": True}, "offloaded"),
    ],
)
def test_optimizer_kernel_mismatches_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(TrainConfig(**overrides), world_size=1)


def test_peak_flops_by_device_name_with_fallback():
    assert peak_flops("NVIDIA H200", 1.0) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 1.0) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", 1.0) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", 1.0) == 312e12
    assert peak_flops("NVIDIA GH200 480GB", 1.0) == 989e12
    assert peak_flops("Some Future GPU", 7e12) == 7e12
    assert peak_flops(None, 3e12) == 3e12  # CPU: train.peak_flops


def test_writer_is_real_on_rank0_and_silent_elsewhere(tmp_path):
    silent = MetricsWriter.for_rank(tmp_path / "r1", rank=1)
    assert isinstance(silent, NullWriter)
    silent.log("train", 1, loss=1.0)
    silent.close()
    assert not (tmp_path / "r1").exists()
    writer = MetricsWriter.for_rank(tmp_path / "r0", rank=0)
    writer.log("train", 1, loss=1.0)
    writer.close()
    assert [r["event"] for r in read_metrics(tmp_path / "r0")] == ["train"]


def test_startup_and_export_timings_reach_the_summary(tmp_path):
    log_launch(tmp_path)
    launch = read_metrics(tmp_path)[0]
    assert launch["event"] == "launch" and launch["process_start"] <= launch["time"]
    t = launch["time"] - 60  # a run that launched a minute ago, so the export below comes after it
    launch = {**launch, "time": t, "process_start": t - 3}
    records = [
        launch,
        {"event": "start", "step": 0, "time": t + 5},
        {"event": "compile", "step": 0, "time": t + 6, "seconds": 1.5},
        {"event": "train", "step": 1, "time": t + 8, "loss": 4.0, "tokens_seen": 10, "tokens_per_s": 1.0,
         "mfu": 0.1},
        {"event": "end", "step": 1, "time": t + 9},
    ]
    timings = startup_timings(records)
    assert timings["fit_to_first_step_s"] == pytest.approx(8)
    assert timings["cold_start_s"] == pytest.approx(11)
    assert timings["compile_s"] == 1.5
    assert "step_to_export_s" not in timings  # not exported yet
    log_event(tmp_path, "exported", path="x")
    exported = read_metrics(tmp_path)[-1]
    timings = startup_timings([*records, exported])
    assert timings["step_to_export_s"] == pytest.approx(exported["time"] - (t + 9))
    console = Console(width=120, record=True)
    console.print(summary_table([*records, exported], "run"))
    text = console.export_text()
    assert "cold start → first logged step" in text and "last step → exported model" in text


@pytest.mark.parametrize("name", ["gpu-125m-1node.yaml", "gpu-1b-2node.yaml"])
def test_gpu_configs_select_the_gpu_paths(name):
    t = load_config(CONFIGS / name).train
    assert t.use_gpu and t.precision == "bf16" and t.torch_compile
    assert deepspeed_config(t, t.num_workers)["bf16"] == {"enabled": True}
    assert t.optimizer_impl in ("deepspeed_fused", "torch_fused")


def test_fp32_zero0_clips_in_the_loop_not_in_deepspeed():
    zero0 = TrainConfig(zero_stage=0, grad_clip=0.5)
    assert loop_clips_gradients(zero0) and deepspeed_config(zero0, 1)["gradient_clipping"] == 0.0
    for cfg in (TrainConfig(zero_stage=3, grad_clip=0.5), TrainConfig(zero_stage=0, grad_clip=0.5,
                                                                      precision="bf16")):
        assert not loop_clips_gradients(cfg) and deepspeed_config(cfg, 1)["gradient_clipping"] == 0.5


def test_zero3_keeps_a_small_model_whole_on_cpu_only():
    zero = lambda cfg: deepspeed_config(cfg, 2)["zero_optimization"]  # noqa: E731
    cpu_auto = zero(TrainConfig())
    assert cpu_auto["stage3_param_persistence_threshold"] == 50_000_000  # each parameter
    assert cpu_auto["stage3_model_persistence_threshold"] == 50_000_000  # and in all: a big model partitions
    assert zero3_whole_elements(TrainConfig(), 12_500_000) == 12_500_000
    assert zero3_whole_elements(TrainConfig(), 7_000_000_000) == 50_000_000
    assert zero3_whole_elements(TrainConfig(use_gpu=True), 12_500_000) == 0
    for deepspeed_default in (TrainConfig(use_gpu=True), TrainConfig(offload_params=True),
                              TrainConfig(zero_stage=1)):
        assert "stage3_param_persistence_threshold" not in zero(deepspeed_default), deepspeed_default
    chosen = TrainConfig(use_gpu=True, zero3_param_persistence_threshold=0)
    assert zero(chosen)["stage3_param_persistence_threshold"] == 0


def test_zero3_persistence_threshold_errors_name_the_field():
    for bad in ("lots", "-1"):
        with pytest.raises(Exception, match=r"train.zero3_param_persistence_threshold.*'auto'") as err:
            load_config(None, [f"train.zero3_param_persistence_threshold={bad}"])
        assert bad in str(err.value)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32))


def test_zero3_leaf_modules_are_decoder_layers_on_cpu_only():
    model = _tiny_llama()
    assert zero3_leaf_classes(TrainConfig(), model) == ["LlamaDecoderLayer"]  # CPU ZeRO-3 auto
    assert zero3_leaf_classes(TrainConfig(use_gpu=True, zero3_leaf_modules="layers"), model) == [
        "LlamaDecoderLayer"]
    for off in (TrainConfig(use_gpu=True), TrainConfig(zero_stage=1), TrainConfig(zero3_leaf_modules="none"),
                TrainConfig(activation_checkpointing=True), TrainConfig(offload_params=True)):
        assert zero3_leaf_classes(off, model) == [], off
    model.model.embed_tokens.weight.requires_grad_(False)  # partly frozen (as LoRA leaves a model)
    assert zero3_leaf_classes(TrainConfig(), model) == []


def test_zero3_leaf_layers_without_a_block_class_names_the_field():
    import torch

    with pytest.raises(ValueError, match=r"zero3_leaf_modules layers: .*allowed for this model: auto, none"):
        zero3_leaf_classes(TrainConfig(zero3_leaf_modules="layers"), torch.nn.Linear(2, 2))
    assert zero3_leaf_classes(TrainConfig(), torch.nn.Linear(2, 2)) == []
    with pytest.raises(Exception, match=r"train.zero3_leaf_modules.*'auto', 'layers' or 'none'"):
        load_config(None, ["train.zero3_leaf_modules=blocks"])
