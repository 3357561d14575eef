import os
import subprocess
import sys

import pytest
import torch

from nanochat.optimizers import MuonAdamW, lr_multiplier, muon_momentum, muon_update, orthogonalize, weight_decay_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    shapes = [(64, 32), (7,), (3000,)]
    ours_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = MuonAdamW([dict(kind="adamw", params=ours_params, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref = torch.optim.AdamW(ref_params, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours_params, ref_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_orthogonalization_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(4, 64, 256), (4, 256, 64)]:
        G = torch.randn(shape)
        s = torch.linalg.svdvals(orthogonalize(G, steps=5))
        assert s.max() < 1.25 and s.min() > 0.6, (shape, s.min(), s.max())
        assert s.max() / s.min() < 2 < (lambda r: r.max() / r.min())(torch.linalg.svdvals(G))
    # a square Gaussian matrix has a few tiny singular values that 5 steps cannot lift; the bulk is near 1
    s = torch.linalg.svdvals(orthogonalize(torch.randn(2, 128, 128), steps=5))
    assert s.max() < 1.25 and ((s > 0.6).float().mean() > 0.9)


def test_muon_update_moves_weights_with_the_norm_it_promises():
    torch.manual_seed(0)
    p = torch.randn(3, 32, 128) * 0.02
    before = p.clone()
    g = torch.randn_like(p)
    momentum_buffer, second = torch.zeros_like(p), torch.zeros(3, 1, 128)
    muon_update(p, g, momentum_buffer, second, lr=0.01, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5,
                ortho_dtype=torch.float32)
    step = (before - p) / 0.01
    # Muon+ fixes the update's Frobenius norm to sqrt(min(m, n)); NorMuon keeps it
    assert torch.allclose(step.norm(dim=(-2, -1)), torch.full((3,), 32 ** 0.5), rtol=1e-3)
    assert (second > 0).all() and momentum_buffer.abs().sum() > 0


def test_compiled_updates_step_as_the_eager_ones_and_schedules_compile_nothing_new():
    """compile() (the training scripts' call when they compile the model) changes speed, not the steps; and once each
    shape has its graph, a schedule's new lr, momentum or weight decay (and AdamW's step count) compiles nothing."""
    torch.manual_seed(0)
    start = [torch.randn(2, 32, 128) * 0.02, torch.randn(64, 16).bfloat16(), torch.randn(40, 16)]
    grads = [[torch.randn(w.shape) for w in start] for _ in range(3)]
    results = []
    for compiled in (False, True):
        muon = [torch.nn.Parameter(w.clone()) for w in start[0]]
        tables = [torch.nn.Parameter(w.clone()) for w in start[1:]]  # a bf16 table with fp32 moments, an fp32 one
        optimizer = MuonAdamW([dict(kind="muon", params=muon, lr=0.02, momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=0.1),
                               dict(kind="adamw", params=tables, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
        if compiled:
            optimizer.compile()
        for i, g in enumerate(grads):
            for p, gp in zip(muon + tables, list(g[0]) + g[1:]):
                p.grad = gp.to(p.dtype)
            with torch.compiler.set_stance("fail_on_recompile" if compiled and i > 0 else "default"):
                optimizer.step()
            for group in optimizer.param_groups:  # as the schedules change them
                group["lr"] *= 0.7
                group["weight_decay"] *= 0.5
                group["momentum"] = group.get("momentum", 0) - 0.01
        results.append([torch.stack([p.detach() for p in muon])] + [p.detach().float() for p in tables])
    eager, fused = results
    assert not torch.equal(eager[0], start[0]) and torch.allclose(eager[0], fused[0], atol=1e-5)
    assert torch.allclose(eager[2], fused[2], rtol=1e-5, atol=1e-7)
    assert torch.allclose(eager[1], fused[1], rtol=8e-3) and not torch.equal(eager[1], start[1].float())


def test_schedules():
    assert lr_multiplier(0, 100, 10, 0.5, 0.0) == 0.1
    assert lr_multiplier(30, 100, 10, 0.5, 0.0) == 1.0
    assert lr_multiplier(75, 100, 10, 0.5, 0.1) == 0.5 + 0.5 * 0.1
    assert lr_multiplier(100, 100, 10, 0.5, 0.05) == 0.05
    assert muon_momentum(0, 1000, 0.5) == 0.85 and muon_momentum(400, 1000, 0.5) == 0.97
    assert abs(muon_momentum(1000, 1000, 0.5) - 0.90) < 1e-9
    # a run whose warmdown starts before step 400 keeps warming up through it, as the reference's does
    assert [round(muon_momentum(s, 300, 0.65), 4) for s in (104, 105, 299)] == [0.8812, 0.8815, 0.9397]
    assert weight_decay_schedule(0, 100, 0.2) == 0.2 and abs(weight_decay_schedule(100, 100, 0.2)) < 1e-12


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """tests/optim_worker.py in 1 process and under torchrun in 2 (gloo): (stdout, saved weights) of each."""
    one, two = tmp_path_factory.mktemp("one") / "one.pt", tmp_path_factory.mktemp("two") / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_DTYPE": "float32"}
    run = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    single = subprocess.run([sys.executable, "-m", "tests.optim_worker", str(one)], **run)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tests.optim_worker", str(two)], **run)
    assert double.returncode == 0, double.stdout + double.stderr
    return (single.stdout, torch.load(one)), (double.stdout, torch.load(two))


def test_two_gloo_processes_equal_one_with_gradient_accumulation(gloo_runs):
    (single, a), (double, b) = gloo_runs
    a, b = a["model"], b["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=2e-5), name
    # ZeRO-2: each rank keeps optimizer state for its share only (13 matrices in 5 shapes -> 7 each, padded)
    assert "muon matrices owned 13, lm_head adam rows 320" in single
    assert "rank 0: muon matrices owned 7, lm_head adam rows 160" in double
    assert "rank 1: muon matrices owned 7, lm_head adam rows 160" in double


def test_two_gloo_processes_give_one_process_bits_where_the_matrix_counts_do_not_divide(gloo_runs):
    """Each rank stacks and updates only the matrices it owns, zero-padded where it owns fewer (or none)."""
    (_, a), (_, b) = gloo_runs
    for i, (x, y) in enumerate(zip(a["uneven"], b["uneven"], strict=True)):
        assert torch.equal(x, y), i


def test_optimizer_state_reshards_to_any_number_of_processes(gloo_runs):
    """What 2 processes saved, put together for 1, is what 1 process has; cut for 2, what each of the 2 had; and
    2 -> 4 -> 3 -> 1 loses nothing."""
    from test_gpt import tiny_model
    (_, one), (_, two) = gloo_runs
    # the worker's model, by shape: 2 layers, n_embd 64, vocab 300 (padded to 320) -> the same parameter groups
    model = tiny_model(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    optimizer = model.setup_optimizer(weight_decay=0.1)
    [single], pair = one["optimizer"], two["optimizer"]

    def assert_same(a, b, atol):
        assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 10
        for i in a["state"]:
            for key, value in a["state"][i].items():
                other = b["state"][i][key]
                assert (torch.allclose(value, other, atol=atol) if torch.is_tensor(value) else value == other), (i, key)

    assert_same(optimizer.reshard(pair, 0, 1), single, atol=2e-5)  # 1 vs 2 processes: float sums in another order
    for rank in range(2):
        assert_same(optimizer.reshard([single], rank, 2), pair[rank], atol=2e-5)
    four = [optimizer.reshard(pair, rank, 4) for rank in range(4)]
    three = [optimizer.reshard(four, rank, 3) for rank in range(3)]
    assert_same(optimizer.reshard(three, 0, 1), optimizer.reshard(pair, 0, 1), atol=0)
    assert four[3]["state"][0]["exp_avg"].shape[0] == 320 // 4  # lm_head's AdamW moments: rows 240-319


def test_fp16_training_scales_its_loss_and_skips_overflowing_steps():
    """The scaler base_train, SFT/mid and RL share: fp16 trains through GradScaler (a step with an inf gradient is
    skipped and the scale halves); other dtypes step plainly."""
    from nanochat.gpt import GPT
    from nanochat.optimizers import LossScaler
    from test_gpt import tiny_model
    base = tiny_model(vocab_size=300)
    model = GPT(base.config, compute_dtype=torch.float16)
    model.load_state_dict(base.state_dict())
    model.cast_embeddings()
    optimizer, scaler = model.setup_optimizer(), LossScaler(torch.float16, "cpu")
    assert scaler.scaler is not None and LossScaler(torch.bfloat16, "cpu").scaler is None
    x = torch.randint(0, 300, (2, 16))
    before = model.lm_head.weight.detach().clone()
    scaler.backward(model(x, x))
    scaler.step(optimizer)
    assert not torch.equal(model.lm_head.weight, before) and torch.isfinite(model.lm_head.weight).all()
    model.zero_grad(set_to_none=True)
    scale, before = scaler.scaler.get_scale(), model.lm_head.weight.detach().clone()
    scaler.backward(model(x, x))
    model.lm_head.weight.grad[0, 0] = float("inf")  # an overflow
    scaler.step(optimizer)
    assert torch.equal(model.lm_head.weight, before) and scaler.scaler.get_scale() == scale / 2
