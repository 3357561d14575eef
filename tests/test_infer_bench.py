import dataclasses
import json

import pytest
import torch

import nanochat.checkpoint_manager as cm
from nanochat.common import PEAK_BANDWIDTH, PEAK_FLOPS, UserError, get_compute_dtype, get_peak_bandwidth, lookup_gpu
from scripts import infer_bench
from test_chat_web import make_chat_model_dir
from test_mamba import tiny_hybrid

ROW_KEYS = {"prompt_tokens", "batch", "ttft_ms", "prefill_tok_per_s", "tpot_ms", "decode_ms", "decode_tok_per_s", "decode_steps",
            "context", "decode_gb_per_s", "mbu_pct", "decode_mfu_pct", "prefill_mfu_pct", "peak_memory_mib"}


@pytest.fixture(autouse=True)
def quick_cpu(monkeypatch):
    """fp32 on one thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads waiting
    for each other (worst in bf16) made these tests 5x slower."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    get_compute_dtype.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    get_compute_dtype.cache_clear()


def run(capsys, *flags):
    infer_bench.main(["-i", "base", "--device-type", "cpu", *flags])
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_sweep_rows_and_card(base_dir, tokenizer, capsys, monkeypatch):
    make_chat_model_dir(base_dir, tokenizer, sequence_len=64)  # 4 layers, 2 kv heads of 16, every window covers 64
    # no GPU here: pretend peaks, so that the MBU, MFU and ceiling arithmetic runs
    monkeypatch.setattr(infer_bench, "get_peak_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(infer_bench, "get_peak_flops", lambda device: 1e9)
    result, out = run(capsys, "--prompt-tokens", "16,100", "--batch-sizes", "1,3", "--decode-tokens", "6")
    card, rows = result["card"], result["rows"]
    assert result["stage"] == "infer_bench" and result["prompt_tokens_asked"] == [16, 100]
    assert result["prompt_tokens"] == [16, 58] and "--prompt-tokens 100 cut to 58" in out  # 58 + 6 = the 64-token context
    assert card["compute_dtype"] == "float32"
    assert card["kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 4  # K and V x attention layers x kv heads x head_dim x fp32
    assert card["attention_layers"] == 4 and card["mamba_layers"] == 0 and card["mamba_state_bytes_per_row"] == 0
    assert card["params"] == sum(card["params_by_dtype"].values()) and 0 < card["weight_bytes_read_per_step"] < card["weight_bytes"]
    for n in (16, 58):  # batch 1 reads the weights and the cache of every token so far, at the middle of the decode
        expected = 1e9 / (card["weight_bytes_read_per_step"] + card["kv_bytes_per_token"] * (n + 3))
        assert card["decode_ceiling_batch1_tok_per_s"][str(n)] == pytest.approx(expected, abs=0.1)

    assert [(r["prompt_tokens"], r["batch"]) for r in rows] == [(16, 1), (16, 3), (58, 1), (58, 3)]
    for r in rows:
        assert set(r) == ROW_KEYS and r["decode_steps"] == 5 and r["context"] == r["prompt_tokens"] + 3
        assert r["ttft_ms"] > 0 and 0 < r["tpot_ms"] <= r["decode_ms"] and r["peak_memory_mib"] > 0
        assert r["prefill_tok_per_s"] == pytest.approx(r["prompt_tokens"] / r["ttft_ms"] * 1e3, rel=1e-3, abs=0.05)
        assert r["decode_tok_per_s"] == pytest.approx(r["batch"] * 5 / r["decode_ms"] * 1e3, rel=1e-3, abs=0.05)
        assert r["decode_tok_per_s"] * r["tpot_ms"] / 1e3 / r["batch"] <= 2.01  # a median is at most twice the mean
        step_bytes = card["weight_bytes_read_per_step"] + r["batch"] * card["kv_bytes_per_token"] * r["context"]
        assert r["mbu_pct"] == pytest.approx(100 * step_bytes / (r["tpot_ms"] / 1e3) / 1e9, rel=1e-2)
        assert r["decode_mfu_pct"] > 0 and r["prefill_mfu_pct"] > 0
    assert "ended early" not in out


def test_hybrid_model_reports_its_mamba_state(base_dir, tokenizer, capsys):
    model = tiny_hybrid("AM", vocab_size=tokenizer.get_vocab_size())  # 3 layers: attention, Mamba, attention
    checkpoint_dir = base_dir / "base_checkpoints" / "d3"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None)
    cm.save_meta(str(checkpoint_dir), 1, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    tokenizer.save(str(base_dir / "tokenizer"))
    result, _ = run(capsys, "--prompt-tokens", "20", "--batch-sizes", "1,2", "--decode-tokens", "4")
    card = result["card"]
    assert card["attention_layers"] == 2 and card["mamba_layers"] == 1
    assert card["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    # conv inputs (inner 128 + B and C 2 x 16 channels, x 3 steps) and the SSM state (8 heads x 16 x 16), in fp32
    assert card["mamba_state_bytes_per_row"] == 4 * (160 * 3 + 8 * 16 * 16)
    assert card["peak_bandwidth"] is None and card["decode_ceiling_batch1_tok_per_s"] == {"20": None}  # a CPU: n/a
    for r in result["rows"]:
        assert r["decode_steps"] == 3 and r["tpot_ms"] > 0 and r["decode_tok_per_s"] > 0 and r["mbu_pct"] is None


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", ""], "--batch-sizes='' must be a comma-separated list of whole numbers"),
    (["--batch-sizes", "1,0"], "--batch-sizes='1,0' must be"),
    (["--prompt-tokens", "128,abc"], "--prompt-tokens='128,abc' must be"),
    (["--prompt-tokens", "1.5"], "--prompt-tokens='1.5' must be"),
    (["--decode-tokens", "1"], "--decode-tokens=1 must be at least 2"),
    (["-t", "-1"], "-t/--temperature=-1.0 must be a number >= 0"),
    (["--decode-tokens", "64"], "--decode-tokens=64 leaves no room for a prompt in this model's 64-token context"),
])
def test_bad_flags_are_one_line(base_dir, tokenizer, flags, message):
    if "64" in flags:
        make_chat_model_dir(base_dir, tokenizer, sequence_len=64)
    with pytest.raises(UserError) as e:
        infer_bench.main(["--device-type", "cpu", *flags])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="not torchrun"):
        infer_bench.main([])


def test_gpu_tables_match_whole_words():
    names = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H100 PCIe": 2.0e12, "NVIDIA H200": 4.8e12, "NVIDIA GH200 480GB": None,
             "NVIDIA A100-SXM4-80GB": 2.039e12, "NVIDIA A100-SXM4-40GB": 1.555e12, "NVIDIA L4": 0.3e12,
             "NVIDIA L40S": 0.864e12, "NVIDIA GeForce RTX 4090": 1.008e12, "Tesla T4": None}
    assert {name: lookup_gpu(PEAK_BANDWIDTH, name) for name in names} == names
    assert lookup_gpu(PEAK_FLOPS, "NVIDIA L40S") == 362e12 and lookup_gpu(PEAK_FLOPS, "NVIDIA L40") is None  # not the L4's
    assert get_peak_bandwidth(torch.device("cpu")) is None
