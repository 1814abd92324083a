"""Training checkpoints (trainer/checkpoint_files.py, checkpoint_save.py, checkpoint_load.py,
trainer/ema.py): exact resume, the reference's model.pt layout readable by inference, rotation,
fallback past a corrupt checkpoint, atomic writes, clear errors, and a 2-process FSDP2
save/load."""
from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import fixed_forward, free_port, init_gloo, tiny_dit  # noqa: E402
from reference_files import find_resume_checkpoint  # noqa: E402

from memflow.checkpoint import CheckpointError, load_generator_checkpoint  # noqa: E402
from memflow.errors import InputError  # noqa: E402
from trainer.checkpoint_files import (  # noqa: E402
    MODEL_FILE,
    RESUME_FILE,
    RunModules,
    checkpoint_dir,
    list_checkpoints,
    remove_leftovers,
    rotate_checkpoints,
)
from trainer.checkpoint_load import load_checkpoint, load_checkpoint_file  # noqa: E402
from trainer.checkpoint_save import save_checkpoint  # noqa: E402
from trainer.ema import EMA, ema_after_iteration, ema_after_resume, plain_name  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _adamw(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=0.01)


def _loss(model, seed: int) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    context = torch.randn(1, 8, cfg.text_dim, generator=g)
    return model(x, torch.tensor([[700.0, 300.0]]), context).square().mean()


def _step(model, optimizer, seed: int) -> None:
    optimizer.zero_grad()
    _loss(model, seed).backward()
    optimizer.step()


class Run:
    """A tiny stage-1 state: generator, critic, their AdamWs (a few steps taken) and an EMA."""

    def __init__(self, gen_seed: int = 0, critic_seed: int = 1, steps: int = 2) -> None:
        self.generator = tiny_dit(seed=gen_seed)
        self.critic = tiny_dit(seed=critic_seed)
        self.gen_opt = _adamw(self.generator)
        self.critic_opt = _adamw(self.critic, lr=5e-3)
        self.ema = EMA(self.generator, decay=0.9)
        for i in range(steps):
            self.train_once(i)

    def train_once(self, seed: int) -> None:
        _step(self.generator, self.gen_opt, seed)
        self.ema.update(self.generator)
        _step(self.critic, self.critic_opt, 100 + seed)

    def modules(self) -> RunModules:
        return RunModules(self.generator, self.critic, self.gen_opt, self.critic_opt, self.ema)

    def save(self, logdir: Path, step: int, **resume_state) -> Path:
        return save_checkpoint(logdir, step, self.modules(), resume_state=resume_state)

    def load(self, logdir: Path, **kwargs):
        return load_checkpoint(logdir, self.modules(), **kwargs)


def _same(a, b) -> bool:
    """Structural equality with torch.equal for tensors (and dtype agreement)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _params_equal(m1, m2) -> bool:
    return _same(dict(m1.state_dict()), dict(m2.state_dict()))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.randn(3).tolist(), torch.rand(4)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# (a) exact resume
# ------------------------------------------------------------------------------------------------
def test_save_then_load_restores_everything_exactly(tmp_path):
    run = Run()
    _seed_all(123)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    folder = run.save(tmp_path, 40, data_position=17, epoch=[1, 2])
    assert folder == checkpoint_dir(tmp_path, 40) == tmp_path / "checkpoint_model_000040"
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, RESUME_FILE]
    expected_draws = _draws()

    fresh = Run(gen_seed=7, critic_seed=8, steps=1)  # other weights, other Adam moments
    _seed_all(999)
    resumed = fresh.load(tmp_path)
    assert _same(_draws(), expected_draws)

    assert resumed.step == 40 and resumed.path == folder / MODEL_FILE
    assert resumed.resume_state == {"data_position": 17, "epoch": [1, 2]}
    assert resumed.critic_loaded and resumed.ema_loaded and resumed.rng_restored
    assert resumed.optimizers_loaded == ("generator_optimizer", "critic_optimizer")
    assert _params_equal(fresh.generator, run.generator)
    assert _params_equal(fresh.critic, run.critic)
    assert not _params_equal(fresh.generator, fresh.critic)
    assert _same(fresh.gen_opt.state_dict(), run.gen_opt.state_dict())
    assert _same(fresh.critic_opt.state_dict(), run.critic_opt.state_dict())
    assert _same(fresh.ema.state_dict(), run.ema.state_dict())

    # The continued runs stay bit-identical (Adam moments, step counts and EMA all restored).
    for r in (run, fresh):
        r.train_once(5)
    assert _params_equal(fresh.generator, run.generator)
    assert _params_equal(fresh.critic, run.critic)
    assert _same(fresh.ema.state_dict(), run.ema.state_dict())


def test_load_without_optimisers_or_rng(tmp_path):
    run = Run()
    run.save(tmp_path, 3)
    gen = tiny_dit(seed=5)
    _seed_all(1)
    before = torch.get_rng_state()
    resumed = load_checkpoint(tmp_path, RunModules(gen), restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert resumed.optimizers_loaded == () and not resumed.critic_loaded and not resumed.ema_loaded
    assert _params_equal(gen, run.generator)


def test_empty_logdir_resumes_nothing(tmp_path):
    assert load_checkpoint(tmp_path / "absent", RunModules(tiny_dit())) is None
    assert find_resume_checkpoint(tmp_path) is None


def test_mismatched_model_raises_naming_the_file(tmp_path):
    Run(steps=0).save(tmp_path, 1)
    from memflow.config import DiTConfig

    other = tiny_dit(DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=16,
                               text_len=16))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, RunModules(other))
    message = str(err.value)
    assert str(tmp_path / "checkpoint_model_000001" / MODEL_FILE) in message
    assert "\n" not in message and "ffn.0.weight" in message


def test_resume_state_must_be_plain(tmp_path):
    run = Run(steps=0)
    with pytest.raises(TypeError, match=r"resume_state\['sampler'\]"):
        run.save(tmp_path, 1, sampler=object())
    assert list(tmp_path.iterdir()) == []


def test_saving_the_same_step_again_replaces_the_folder(tmp_path):
    run = Run(steps=1)
    run.save(tmp_path, 5)
    run.train_once(9)
    run.save(tmp_path, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_model_000005"]
    gen = tiny_dit(seed=3)
    load_checkpoint(tmp_path, RunModules(gen))
    assert _params_equal(gen, run.generator)


# ------------------------------------------------------------------------------------------------
# (b) model.pt is the reference's layout and loads for inference
# ------------------------------------------------------------------------------------------------
def test_model_pt_loads_for_inference_with_and_without_ema(tmp_path):
    run = Run()
    folder = run.save(tmp_path, 7)
    data = torch.load(folder / MODEL_FILE, weights_only=True)
    assert set(data) == {"generator", "critic", "generator_ema", "step"} and data["step"] == 7
    assert all(k.startswith("model.") for e in ("generator", "critic", "generator_ema")
               for k in data[e])
    assert "model.blocks.0.self_attn.q.weight" in data["generator"]

    model = tiny_dit(seed=11)
    result = load_generator_checkpoint(model, folder / MODEL_FILE)
    assert result.step == 7 and result.entry == "generator"
    assert torch.equal(fixed_forward(model), fixed_forward(run.generator))

    ema_model = tiny_dit(seed=11)
    result = load_generator_checkpoint(ema_model, folder / MODEL_FILE, use_ema=True)
    assert result.missing_keys == () and result.unexpected_keys == ()
    reference = tiny_dit(seed=12)
    run.ema.copy_to(reference)
    assert torch.equal(fixed_forward(ema_model), fixed_forward(reference))
    assert not torch.equal(fixed_forward(ema_model), fixed_forward(run.generator))


def test_generator_ckpt_file_without_critic_or_resume(tmp_path):
    """An ode_init.pt-like file: only "generator" (raw names); loads, critic left alone."""
    gen = tiny_dit(seed=4)
    path = tmp_path / "ode_init.pt"
    torch.save({"generator": gen.state_dict()}, path)
    target, critic = tiny_dit(seed=5), tiny_dit(seed=6)
    critic_before = {k: v.clone() for k, v in critic.state_dict().items()}
    resumed = load_checkpoint_file(path, RunModules(target, critic, _adamw(target)))
    assert _params_equal(target, gen) and _same(dict(critic.state_dict()), critic_before)
    assert resumed.step == 0 and not resumed.critic_loaded and resumed.optimizers_loaded == ()


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
def test_ema_update_formula_and_names():
    model = tiny_dit(seed=0)
    ema = EMA(model, decay=0.75)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert list(start) == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        want = start[name].clone().mul_(0.75).add_(p.detach().float(), alpha=0.25)
        assert torch.equal(ema.shadow[name], want), name
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ema.shadow.values())
    assert plain_name("_orig_mod.blocks.0._checkpoint_wrapped_module.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert plain_name("model._fsdp_wrapped_module.head.head.weight") == "model.head.head.weight"


def test_ema_load_rejects_other_model():
    ema = EMA(tiny_dit(), 0.9)
    with pytest.raises(ValueError, match="does not fit"):
        ema.load_state_dict({"model.nope": torch.zeros(1)})


def test_ema_creation_rule():
    model = tiny_dit()
    ema = EMA(model, 0.99)
    assert ema_after_resume(ema, step=100, ema_start_step=200) is None
    assert ema_after_resume(ema, step=200, ema_start_step=200) is ema
    assert ema_after_iteration(None, model, 199, 200, 0.99) is None
    created = ema_after_iteration(None, model, 200, 200, 0.99)
    assert isinstance(created, EMA) and created.decay == 0.99
    assert ema_after_iteration(created, model, 201, 200, 0.99) is created
    assert ema_after_iteration(None, model, 300, 200, 0.99, enabled=False) is None
    assert ema_after_iteration(None, model, 300, 200, 0.0) is None


# ------------------------------------------------------------------------------------------------
# (c) rotation
# ------------------------------------------------------------------------------------------------
def _fake_checkpoint(logdir: Path, name: str, with_model: bool = True) -> Path:
    folder = logdir / name
    folder.mkdir(parents=True)
    if with_model:
        (folder / MODEL_FILE).write_bytes(b"x")
    return folder


def test_rotation_keeps_newest_complete_and_ignores_the_rest(tmp_path):
    complete = [_fake_checkpoint(tmp_path, f"checkpoint_model_{s:06d}") for s in (100, 200, 300)]
    bigger = _fake_checkpoint(tmp_path, "checkpoint_model_1000000")  # sorts by integer
    smaller_long_name = _fake_checkpoint(tmp_path, "checkpoint_model_0000050")
    untouched = [
        _fake_checkpoint(tmp_path, "checkpoint_model_000400", with_model=False),  # incomplete
        _fake_checkpoint(tmp_path, ".checkpoint_model_000500.123.abcd.partial"),  # temp folder
        _fake_checkpoint(tmp_path, "checkpoint_model_x"),
        _fake_checkpoint(tmp_path, "checkpoint_model_000010.bak"),
        _fake_checkpoint(tmp_path, "vis"),
    ]
    (tmp_path / "checkpoint_model_000001").write_text("a file, not a folder")

    assert [c.step for c in list_checkpoints(tmp_path)] == [50, 100, 200, 300, 1000000]
    assert rotate_checkpoints(tmp_path, 0) == []
    deleted = rotate_checkpoints(tmp_path, 2)
    assert deleted == [smaller_long_name, complete[0], complete[1]]
    assert [c.path for c in list_checkpoints(tmp_path)] == [complete[2], bigger]
    assert all(p.exists() for p in untouched) and (tmp_path / "checkpoint_model_000001").is_file()
    assert not any(p.name.endswith(".deleting") for p in tmp_path.iterdir())
    assert find_resume_checkpoint(tmp_path) == bigger
    assert rotate_checkpoints(tmp_path, 5) == []


def test_rotation_after_real_saves(tmp_path):
    run = Run(steps=0)
    for step in (1, 2, 3, 4):
        run.save(tmp_path, step)
        rotate_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_model_000002", "checkpoint_model_000003", "checkpoint_model_000004"]


# ------------------------------------------------------------------------------------------------
# (d) fallback past a corrupt latest checkpoint
# ------------------------------------------------------------------------------------------------
def _cut(path: Path, keep) -> None:
    """Cut a file to `keep(size)` bytes, as a kill or a full disk mid-write leaves it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(keep(size))


CUTS = {"half": lambda size: size // 2, "tail": lambda size: size - 10}  # tail: torch's Errno 22


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("broken", [MODEL_FILE, RESUME_FILE, "rank_0.pt"])
def test_corrupt_latest_falls_back_with_one_line_warning(tmp_path, caplog, broken, cut):
    """A cut model.pt, resume.pt or (stage 2) rank_0.pt in the newest folder: the previous one
    is resumed, rank state included, after one warning that names the file and says what is
    wrong with it in words, not torch's internals."""
    run = Run(steps=1)
    saved = {k: v.clone() for k, v in run.generator.state_dict().items()}
    save_checkpoint(tmp_path, 2, RunModules(run.generator, run.critic),
                    resume_state={"data_position": 2}, rank_state={"position": torch.arange(2)})
    run.train_once(7)
    latest = save_checkpoint(tmp_path, 4, RunModules(run.generator, run.critic),
                             resume_state={"data_position": 4},
                             rank_state={"position": torch.arange(4)})
    bad = latest / broken
    _cut(bad, CUTS[cut])

    gen = tiny_dit(seed=9)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint_load"):
        resumed = load_checkpoint(tmp_path, RunModules(gen))
    assert resumed.step == 2 and resumed.resume_state == {"data_position": 2}
    assert _same(resumed.rank_state, {"position": torch.arange(2)})
    assert _same(dict(gen.state_dict()), saved)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "\n" not in warnings[0]
    assert "checkpoint_model_000002" in warnings[0]
    assert "not a complete checkpoint (truncated or corrupt" in warnings[0], warnings[0]
    assert "mmap" not in warnings[0] and "Errno" not in warnings[0]


def test_all_corrupt_raises_saying_how_to_start_over(tmp_path):
    run = Run(steps=0)
    folder = run.save(tmp_path, 1)
    (folder / MODEL_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        load_checkpoint(tmp_path, RunModules(tiny_dit()))
    assert "--no-auto-resume" in str(err.value) and "another --logdir" in str(err.value)


def test_start_removes_only_the_leftovers_of_a_killed_write_or_rotation(tmp_path):
    """kill -9 mid-write leaves `.checkpoint_model_<step>.<pid>.<hex>.partial`, mid-rotation
    `.checkpoint_model_<step>.<hex>.deleting`: both go; nothing else in the logdir is touched
    (other names, files, a symlink to a folder elsewhere and what it points to)."""
    complete = Run(steps=0).save(tmp_path, 2)
    leftovers = [_fake_checkpoint(tmp_path, ".checkpoint_model_000004.4242.0a1b2c3d.partial"),
                 _fake_checkpoint(tmp_path, ".checkpoint_model_000001.deadbeef.deleting")]
    (leftovers[0] / "resume.pt").write_bytes(b"x" * 100)
    kept = [_fake_checkpoint(tmp_path, name) for name in (
        ".checkpoint_model_000004.partial", ".other_000004.4242.0a1b2c3d.partial",
        "checkpoint_model_000004.4242.0a1b2c3d.partial", ".checkpoint_model_000004.x.deleting")]
    (tmp_path / ".checkpoint_model_000005.1.0a1b2c3d.partial").write_text("a file")
    elsewhere = _fake_checkpoint(tmp_path.parent / f"{tmp_path.name}_elsewhere", "target")
    (tmp_path / ".checkpoint_model_000006.1.0a1b2c3d.partial").symlink_to(elsewhere)
    before = sorted(p.name for p in tmp_path.iterdir())

    assert remove_leftovers(tmp_path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        set(before) - {p.name for p in leftovers})
    assert all(p.is_dir() for p in kept) and (elsewhere / MODEL_FILE).is_file()
    assert find_resume_checkpoint(tmp_path) == complete
    assert remove_leftovers(tmp_path / "absent") == []


# ------------------------------------------------------------------------------------------------
# (e) a crash while writing leaves nothing under a final name
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", [1, 2])
def test_crash_while_writing_leaves_no_folder(tmp_path, monkeypatch, fail_at):
    run = Run(steps=0)
    run.save(tmp_path, 1)
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            real_save(obj, f, *args, **kwargs)  # a partial file exists when the crash comes
            raise RuntimeError("simulated crash")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_model_000001"]
    assert find_resume_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def _full_disk_save(with_context: bool):
    """A torch.save that fails as it does on a full disk: its zip writer turns the OSError of a
    write into `RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`,
    raised while handling the OSError (as seen on a full tmpfs) or without it."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a partial file exists when the failure comes
        message = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        if not with_context:
            raise RuntimeError(message)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError(message)  # noqa: B904 (torch raises it this way)

    return save


@pytest.mark.parametrize("with_context", [True, False], ids=["oserror-context", "free-space"])
def test_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch,
                                                                  with_context):
    """Disk full while a stage-1 checkpoint is written: the CLI's one-line CheckpointError
    `cannot write checkpoint <final path>: No space left on device`, no folder left behind."""
    import shutil
    from collections import namedtuple

    run = Run(steps=0)
    monkeypatch.setattr(torch, "save", _full_disk_save(with_context))
    if not with_context:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 512, 512))
    with pytest.raises(CheckpointError) as err:
        run.save(tmp_path, 3)
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'checkpoint_model_000003' / MODEL_FILE}: "
                              "No space left on device"), message
    assert "\n" not in message and "inline_container" not in message
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_torch_save_is_a_stop_not_a_write_failure(tmp_path, monkeypatch):
    """SIGTERM while torch.save writes: the handler's Terminated, raised inside the zip writer,
    comes out as its "unexpected pos" RuntimeError. It is still a stop (exit 143, resume from the
    previous checkpoint), not a failed write (exit 2), and no folder is left behind."""
    import os
    import signal

    from utils.signals import Terminated, sigterm_raises

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Terminated here
        except Terminated:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 "
                               "vs 598") from None  # as the C++ writer reports it

    run = Run(steps=0)
    monkeypatch.setattr(torch, "save", save)
    with sigterm_raises(), pytest.raises(Terminated):
        run.save(tmp_path, 3)
    assert list(tmp_path.iterdir()) == []


def test_other_torch_save_failures_keep_their_traceback(tmp_path, monkeypatch):
    """A zip-writer failure with plenty of free space is named as a failed write; any other
    RuntimeError of torch.save is a bug and propagates unchanged."""
    run = Run(steps=0)
    monkeypatch.setattr(torch, "save", _full_disk_save(with_context=False))
    with pytest.raises(CheckpointError, match=r"model\.pt: the write failed \(\[enforce fail"):
        run.save(tmp_path, 3)

    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):
        run.save(tmp_path, 3)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# (f) an unwritable logdir
# ------------------------------------------------------------------------------------------------
def test_unwritable_logdir_is_a_one_line_input_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    logdir = blocker / "logs"
    with pytest.raises(InputError) as err:
        Run(steps=0).save(logdir, 1)
    message = str(err.value)
    assert str(logdir) in message and "\n" not in message


# ------------------------------------------------------------------------------------------------
# (g) FSDP2 on two Gloo processes
# ------------------------------------------------------------------------------------------------
WORLD = 2


def _fsdp_worker(rank: int, port: int, logdir: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        from memflow.fsdp import shard_model

        def build(gen_seed: int, critic_seed: int, steps: int):
            gen = shard_model(tiny_dit(seed=gen_seed))
            critic = shard_model(tiny_dit(seed=critic_seed))
            gopt, copt = _adamw(gen), _adamw(critic, lr=5e-3)
            ema = EMA(gen, 0.9)
            for i in range(steps):
                _step(gen, gopt, 10 * i + rank)
                ema.update(gen)
                _step(critic, copt, 100 + 10 * i + rank)
            return gen, critic, gopt, copt, ema

        def full(model):
            return {n: p.full_tensor() for n, p in model.named_parameters()}

        def full_opt(model, opt):
            return get_optimizer_state_dict(
                model, opt, options=StateDictOptions(full_state_dict=True))

        gen, critic, gopt, copt, ema = build(0, 1, 2)
        torch.manual_seed(1000 + rank)
        save_checkpoint(logdir, 6, RunModules(gen, critic, gopt, copt, ema),
                        resume_state={"data_position": 6})
        draw = torch.rand(3)
        rotate_checkpoints(logdir, 1)

        gen2, critic2, gopt2, copt2, ema2 = build(5, 6, 1)
        resumed = load_checkpoint(logdir, RunModules(gen2, critic2, gopt2, copt2, ema2))
        checks = {
            "step": resumed.step == 6 and resumed.resume_state == {"data_position": 6},
            "rng": torch.equal(torch.rand(3), draw),
            "sharded": all(p.to_local().numel() < p.numel() for p in gen2.parameters()
                           if p.dim() > 0 and p.shape[0] >= WORLD),
            "generator": _same(full(gen2), full(gen)),
            "critic": _same(full(critic2), full(critic)),
            "gen_opt": _same(full_opt(gen2, gopt2), full_opt(gen, gopt)),
            "critic_opt": _same(full_opt(critic2, copt2), full_opt(critic, copt)),
            "ema": _same(ema2.state_dict(), ema.state_dict()),
            "ema_rank0_only": (len(ema.shadow) > 0) == (rank == 0),
        }
        # One more identical step on both copies stays identical.
        _step(gen, gopt, 77 + rank)
        _step(gen2, gopt2, 77 + rank)
        checks["continued"] = _same(full(gen2), full(gen))
        torch.save(checks, Path(logdir) / f"rank{rank}.result")
        # every rank's collectives are done before any tears its Gloo pairs down (a rank that
        # exits first can leave the other's transport threads to std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_two_processes_save_and_resume(tmp_path):
    # a failing rank ends the others (spawn's join); a collective mismatch ends at Gloo's timeout
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        checks = torch.load(tmp_path / f"rank{rank}.result")
        assert all(checks.values()), f"rank {rank}: {checks}"

    # The folder rank 0 wrote loads into a plain, unsharded model for inference.
    model = tiny_dit(seed=3)
    load_generator_checkpoint(model, checkpoint_dir(tmp_path, 6) / MODEL_FILE)
    data = torch.load(checkpoint_dir(tmp_path, 6) / RESUME_FILE, weights_only=True)
    assert data["world_size"] == WORLD and len(data["rng"]) == WORLD


# ------------------------------------------------------------------------------------------------
# (h) the end of a run and a killed run's leftovers, through the stage-1 trainer
# ------------------------------------------------------------------------------------------------
def _log_steps(logdir: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (logdir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("behaviour, final", [("clean", 2), ("compat", 3)])
def test_a_run_ends_at_its_final_step_saves_it_and_a_rerun_redoes_nothing(tmp_path, behaviour,
                                                                          final):
    """max_iters 2: clean runs iterations 0 and 1 (ends at step 2), compat one more as the
    reference's `while s <= max_iters` (step 3, TRAINING.md §10 item 25); either way the last
    step is saved although log_iters does not divide it, so a rerun resumes there and trains
    nothing."""
    from test_train_loop import make_settings, make_trainer

    settings = make_settings(tmp_path / "run", max_iters=2, log_iters=100, behaviour=behaviour)
    trainer = make_trainer(settings)
    trainer.run()
    assert trainer.step == trainer.final_step == final
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [final]
    assert _log_steps(tmp_path / "run") == list(range(1, final + 1))

    again = make_trainer(settings)
    assert again.step == final
    steps: list[int] = []
    again.run(on_step=steps.append)
    assert steps == [] and _log_steps(tmp_path / "run") == list(range(1, final + 1))


def test_videos_of_the_resumed_step_are_written_again_after_a_kill(tmp_path):
    """A run killed while writing the sample videos of its checkpointed last step (the video
    missing, its `.partial.mp4` left): the rerun resumes at that step, removes the partial and
    writes the video again, byte for byte the one an uninterrupted run wrote."""
    from test_train_loop import make_settings, make_trainer

    settings = make_settings(tmp_path / "run", max_iters=2, log_iters=2, vis_interval=2)
    make_trainer(settings).run()
    (video,) = sorted((tmp_path / "run" / "vis").rglob("*.mp4"))
    assert video.name == "step_0000002_rank_0_sample_0_len_6.mp4"
    original = video.read_bytes()
    partial = video.with_name(f".{video.stem}.partial.mp4")
    video.rename(partial)  # kill -9 mid-encode: only the partial exists

    make_trainer(settings).run()
    assert video.read_bytes() == original
    assert not partial.exists()
    assert sorted(p.name for p in video.parent.iterdir()) == [video.name]
