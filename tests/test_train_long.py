"""Stage2Trainer end to end on configs/tiny_train_long.yaml, in process: LoRA-only training,
lora.pt into the interactive pipeline, exact resume with a sequence in flight, the base step
rule, the stage-2 visualisation and bad input."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CPU, fixed_forward, make_trainer, named_params, train_settings

from memflow.errors import InputError
from memflow.lora import LoraSettings, add_lora
from trainer.checkpoint_files import RunModules
from trainer.checkpoint_save import save_checkpoint
from trainer.config import TrainSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_train_long.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_settings(logdir: Path | None = None, **overrides: Any) -> TrainSettings:
    overrides.setdefault("vis_interval", 0)
    return train_settings(CONFIG, logdir, **overrides)


def _split(named: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    lora = {k: v for k, v in named.items() if ".lora_" in k}
    return lora, {k: v for k, v in named.items() if ".lora_" not in k}


# ------------------------------------------------------------------------------------------------
# LoRA: only the adapters train, and they start at the base model
# ------------------------------------------------------------------------------------------------
def test_only_lora_trains_and_base_weights_stay_bit_identical(tmp_path):
    trainer = make_trainer(make_settings(tmp_path / "run", max_iters=3, log_iters=100))
    before = {name: named_params(m) for name, m in (("generator", trainer.generator),
                                                    ("critic", trainer.critic),
                                                    ("teacher", trainer.teacher))}
    trainer.run()
    assert trainer.step == 3
    for name, model in (("generator", trainer.generator), ("critic", trainer.critic)):
        lora_before, base_before = _split(before[name])
        lora_after, base_after = _split(named_params(model))
        assert len(lora_before) == 2 * 10 * 2  # 10 linears per block, 2 blocks, A and B
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(lora_before)
        assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), name
        changed = [k for k in lora_before if not torch.equal(lora_before[k], lora_after[k])]
        assert changed, f"no {name} LoRA weight moved"
    assert all(torch.equal(v, named_params(trainer.teacher)[k]) for k, v in before["teacher"].items())


def test_fresh_lora_forward_equals_the_base_model():
    from memflow.tiny import build_tiny_generator

    settings = make_settings()
    model = build_tiny_generator(settings.tiny.section("generator"))
    base = fixed_forward(model)
    add_lora(model, settings.lora)
    assert torch.equal(fixed_forward(model), base)


# ------------------------------------------------------------------------------------------------
# lora.pt: the reference's layout, loadable by interactive inference
# ------------------------------------------------------------------------------------------------
def _interactive_latents(settings: TrainSettings, lora_ckpt: Path | None) -> torch.Tensor:
    """Latents of interactive inference (one switch) with the run's base generator, loading
    the run's lora.pt through inference's own loader when `lora_ckpt` is given."""
    from memflow.config import SwitchOptions
    from memflow.lora import apply_lora
    from memflow.noise import SeededNoise
    from memflow.tiny import build_tiny_generator
    from pipeline.build import finalize_for_inference
    from pipeline.interactive_inference import InteractiveInferencePipeline

    generator = build_tiny_generator(settings.tiny.section("generator"))
    if lora_ckpt is not None:
        generator = apply_lora(generator, LoraSettings(rank=4, alpha=4), lora_ckpt)
    generator = finalize_for_inference(generator, merge_lora=False, device=CPU, dtype=torch.float32)
    pipe = InteractiveInferencePipeline(generator, settings.stream, settings.sampling)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 64, generator.config.text_dim, generator=g) for _ in range(2)]
    return pipe.generate_latents_interactive(prompts, [2], 12, settings.latent_hw,
                                             SeededNoise(0), SwitchOptions())


def test_trained_lora_pt_has_the_reference_layout_and_changes_interactive_inference(tmp_path):
    trainer = make_trainer(make_settings(tmp_path / "run", max_iters=3, log_iters=3))
    trainer.run()
    path = tmp_path / "run" / "checkpoint_model_000003" / "model.pt"
    data = torch.load(path, weights_only=True)
    assert set(data) == {"generator_lora", "critic_lora", "step"} and data["step"] == 3
    keys = sorted(data["generator_lora"])
    assert len(keys) == 40
    assert "base_model.model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert "base_model.model.blocks.1.ffn.2.lora_B.weight" in keys
    assert data["generator_lora"]["base_model.model.blocks.0.ffn.0.lora_A.weight"].shape == (4, 32)
    trained = {k: v for k, v in named_params(trainer.generator).items() if ".lora_" in k}
    for key, value in data["generator_lora"].items():
        own = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(trained[own], value)

    plain = _interactive_latents(trainer.settings, None)
    adapted = _interactive_latents(trainer.settings, path)
    assert plain.shape == adapted.shape
    assert (plain - adapted).abs().max() > 1e-4


def test_reference_lora_pt_layout_resumes_as_lora_ckpt(tmp_path):
    """A lora.pt in the reference's layout (PEFT names, rank 4) starts a run through lora_ckpt;
    another rank is refused naming the key to change."""
    trainer = make_trainer(make_settings(tmp_path / "a", max_iters=1, log_iters=1))
    trainer.run()
    ckpt = tmp_path / "a" / "checkpoint_model_000001" / "model.pt"
    started = make_trainer(make_settings(tmp_path / "b", lora_ckpt=str(ckpt)))
    for name, value in torch.load(ckpt, weights_only=True)["critic_lora"].items():
        own = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(dict(started.critic.named_parameters())[own], value)
    assert started.step == 0  # clean: a LoRA start does not inherit the file's step
    with pytest.raises(InputError, match=r"rank.*adapter\.rank is 8, the file holds rank 4"):
        make_trainer(make_settings(tmp_path / "c", lora_ckpt=str(ckpt), **{"adapter.rank": 8}))


# ------------------------------------------------------------------------------------------------
# Base checkpoint: architecture check and the step rule (§10 item 14)
# ------------------------------------------------------------------------------------------------
def _write_base(tmp_path: Path, step: int, **tiny: Any) -> Path:
    from memflow.tiny import build_tiny_generator

    section = {**make_settings().tiny.section("generator"), **tiny}
    generator, critic = build_tiny_generator(section), build_tiny_generator(section)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.01)
    return save_checkpoint(tmp_path / "base", step, RunModules(generator, critic)) / "model.pt"


@pytest.mark.parametrize("behaviour", ["clean", "compat"])
def test_base_checkpoint_loads_and_its_step_counts_only_in_compat(tmp_path, behaviour):
    base = _write_base(tmp_path, step=7)
    trainer = make_trainer(make_settings(tmp_path / "run", generator_ckpt=str(base),
                                         behaviour=behaviour))
    assert trainer.step == (7 if behaviour == "compat" else 0)
    saved = torch.load(base, weights_only=True)["generator"]
    weight = dict(trainer.generator.named_parameters())["blocks.0.self_attn.q.base_layer.weight"]
    assert torch.equal(weight, saved["model.blocks.0.self_attn.q.weight"])


def test_base_checkpoint_of_another_architecture_is_refused_naming_the_file(tmp_path):
    base = _write_base(tmp_path, step=0, ffn_dim=48)
    with pytest.raises(InputError, match=r"model\.pt \(entry 'generator'\) does not fit the model"):
        make_trainer(make_settings(tmp_path / "run", generator_ckpt=str(base)))


# ------------------------------------------------------------------------------------------------
# Resume with a sequence in flight
# ------------------------------------------------------------------------------------------------
def _state(trainer) -> dict[str, Any]:
    return {
        "step": trainer.step,
        "generator": named_params(trainer.generator),
        "critic": named_params(trainer.critic),
        "gen_opt": trainer.generator_opt.state_dict()["state"],
        "crit_opt": trainer.critic_opt.state_dict()["state"],
        "data": trainer.loader.state_dict(),
        "sequence": (trainer.sequence.index, trainer.sequence.generated),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a["step"] == b["step"] and a["data"] == b["data"] and a["sequence"] == b["sequence"]
    worst = 0.0
    for key in ("generator", "critic"):
        for name, value in a[key].items():
            worst = max(worst, (value - b[key][name]).abs().max().item())
    for key in ("gen_opt", "crit_opt"):
        assert a[key].keys() == b[key].keys()
        for idx, slot in a[key].items():
            for name, value in slot.items():
                worst = max(worst, (value.double() - b[key][idx][name].double()).abs().max().item())
    return worst


# relative positions with a 12-frame RoPE table: the 18-frame sequences run past it
POSITIONS = {"absolute": {}, "relative": {"positions": "relative", "tiny.rope_max_frames": 12}}


@pytest.mark.parametrize("positions", POSITIONS)
def test_resume_with_a_sequence_in_flight_is_exact(tmp_path, positions):
    """Checkpoints every 2 iterations; at step 2 the first sequence is 12 of 18 frames in (3
    windows used). Run B stops after 3 iterations, a new trainer resumes from step 2 (weights,
    Adam moments, data position, the sequence's cache/bank/latents) and finishes: everything
    equals the uninterrupted run A, bitwise. In relative positions the sequences are longer
    than the generator's RoPE table."""
    overrides = dict(max_iters=5, log_iters=2, **POSITIONS[positions])
    a = make_trainer(make_settings(tmp_path / "a", **overrides))
    a.run()
    b1 = make_trainer(make_settings(tmp_path / "b", **overrides))
    b1.run(stop_after=3)
    del b1
    rank_file = tmp_path / "b" / "checkpoint_model_000002" / "rank_0.pt"
    in_flight = torch.load(rank_file, weights_only=True)["sequence"]
    assert in_flight is not None and 0 < in_flight["generated"] < in_flight["max_length"]
    b2 = make_trainer(make_settings(tmp_path / "b", **overrides))
    assert b2.step == 2 and b2.sequence is not None
    assert b2.sequence.generated == in_flight["generated"]
    b2.run()
    worst = _same(_state(a), _state(b2))
    print(f"\n[stage-2 resume] max |A - B| over weights and Adam moments: {worst:.3e}")
    assert worst == 0.0


# ------------------------------------------------------------------------------------------------
# Visualisation (the reference's never runs, §10 item 28) and bad input
# ------------------------------------------------------------------------------------------------
def test_stage2_visualisation_writes_a_switch_video(tmp_path):
    trainer = make_trainer(make_settings(tmp_path / "runs" / "run", max_iters=1, vis_interval=1,
                                         vis_video_lengths="[12]", log_iters=100))
    trainer.run()
    videos = sorted((tmp_path / "runs" / "run" / "vis").rglob("*.mp4"))
    assert [v.name for v in videos] == [
        "step_0000001_rank_0_sample_0_len_12_lora_switch_frame_6.mp4"] or (
        len(videos) == 1 and "_lora_switch_frame_" in videos[0].name)
    assert videos[0].stat().st_size > 0


@pytest.mark.parametrize("overrides, message", [
    ({"streaming_chunk_size": 7}, r"`streaming_chunk_size` \(7\) must be a multiple of num_frame_per_block"),
    ({"switch_choices": "[21, 24]"}, r"`switch_choices`: no switch frame below streaming_max_length \(18\)"),
    ({"switch_choices": "[4]"}, r"switch frame 4 must be a positive multiple"),
    ({"streaming_min_new_frame": 6}, r"`streaming_min_new_frame` \(6\) must be smaller"),
    ({"global_sink": False}, r"`global_sink`: false .* compat"),
    ({"adapter.rank": 0}, r"`adapter.rank` must be >= 1, got 0"),
])
def test_bad_stage2_config_is_one_line(overrides, message):
    with pytest.raises(InputError, match=message):
        make_settings(**overrides)


def test_absolute_positions_refuse_sequences_past_the_table():
    with pytest.raises(InputError, match=r"18 latent frames are past the generator's RoPE table "
                                         r"\(12 frames\) with positions: absolute; positions: relative"):
        make_settings(**{"tiny.rope_max_frames": 12})


def test_switch_prompt_file_of_another_length_is_refused(tmp_path):
    short = tmp_path / "switch.txt"
    short.write_text("only one line\n")
    with pytest.raises(InputError, match=r"switch\.txt: 1 lines, but .*tiny_train_prompts\.txt has 12"):
        make_settings(switch_prompt_path=str(short))


# ------------------------------------------------------------------------------------------------
# Two processes (FSDP2 on Gloo)
# ------------------------------------------------------------------------------------------------
WORLD = 2


def _dist_worker(rank: int, port: int, out_dir: str, base: str) -> None:
    import torch.distributed as dist
    from conftest import init_gloo
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    init_gloo(rank, WORLD, port)
    try:
        torch.set_num_threads(1)
        settings = make_settings(Path(out_dir) / "run", batch_size=1, generator_ckpt=base,
                                 max_iters=1, log_iters=1)
        trainer = make_trainer(settings)
        sharded = all(isinstance(p, DTensor) for p in trainer.generator.parameters())
        trainer.run()
        full = StateDictOptions(full_state_dict=True)
        out = {
            "sharded": sharded,
            "prompts": trainer.sequence.prompts,
            "generated": trainer.sequence.generated,
            "generator": {k: v.clone() for k, v in
                          get_model_state_dict(trainer.generator, options=full).items()},
            "critic": {k: v.clone() for k, v in
                       get_model_state_dict(trainer.critic, options=full).items()},
        }
        resumed = make_trainer(settings)  # every rank continues its own sequence
        out["resumed"] = (resumed.step, resumed.sequence.prompts, resumed.sequence.generated)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_batch_two(tmp_path):
    """FSDP2 with LoRA: base weights loaded before sharding, adapters seeded alike on every rank,
    gradients averaged; after one generator iteration the weights equal a one-process run with
    both ranks' prompt pairs in one batch. The checkpoint's per-rank files resume each rank's own
    sequence, and lora.pt is gathered whole."""
    import torch.multiprocessing as mp
    from conftest import free_port

    base = _write_base(tmp_path, step=0)
    mp.spawn(_dist_worker, args=(free_port(), str(tmp_path), str(base)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["sharded"] for r in ranks)
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    for r in ranks:
        assert r["resumed"] == (1, r["prompts"], r["generated"])
    saved = torch.load(tmp_path / "run" / "checkpoint_model_000001" / "model.pt", weights_only=True)
    assert len(saved["generator_lora"]) == 40 and len(saved["critic_lora"]) == 40

    single = make_trainer(make_settings(batch_size=2, generator_ckpt=str(base)))
    single.train_step()
    assert single.sequence.prompts == ranks[0]["prompts"] + ranks[1]["prompts"]
    worst = 0.0
    for role, model in (("generator", single.generator), ("critic", single.critic)):
        mine = {k: v.detach() for k, v in model.state_dict().items()}
        assert max((ranks[0][role][k] - ranks[1][role][k]).abs().max().item() for k in mine) == 0
        scale = max(v.abs().max().item() for v in mine.values())
        worst = max(worst, max((mine[k] - ranks[0][role][k]).abs().max().item() for k in mine) / scale)
    print(f"\n[stage-2, 2 processes] max |2-proc - 1-proc| / max|w|: {worst:.2e}")
    assert worst <= 1e-5


def test_compat_mode_runs_a_whole_sequence_through_its_switch(tmp_path):
    """behaviour: compat (the reference's training bugs by name: zeroed sink at the switch,
    zero text query, stale prototype re-compressed, 21-frame-window recache, base step) trains
    through a whole sequence, switch included."""
    trainer = make_trainer(make_settings(behaviour="compat", max_iters=2, log_iters=100))
    assert trainer.settings.streaming.recache_frames == 6
    assert not trainer.settings.streaming.switch_options.global_sink
    assert trainer.settings.stream.memory.reinsert_stale_prototype
    trainer.run()
    seq = trainer.sequence
    assert seq.generated == 18 and seq.switched and seq.recaches == 1
    sink = 3 * seq.state.frame_len
    assert all(k[:, :sink].abs().max() == 0 for k in seq.state.kv.k)  # §10 item 1


@pytest.mark.parametrize("train_first, frames", [(True, 9), (False, 12)])
def test_generator_iteration_consumes_two_windows_or_three_without_train_first_chunk(
        train_first, frames):
    """§5.4: a generator iteration trains one window and gives the next to the critic; with
    train_first_chunk false the sequence's first window is generated as context only."""
    trainer = make_trainer(make_settings(train_first_chunk=train_first))
    trainer.train_step()
    assert trainer.sequence.generated == frames  # windows of 6, then 3 new frames
    trainer.train_step()  # critic only: one more window
    assert trainer.sequence.generated == frames + 3


# ------------------------------------------------------------------------------------------------
# Sequences that start from an image (`start_images`)
# ------------------------------------------------------------------------------------------------
def _images(folder: Path, count: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for k in range(count):
        pixels = np.zeros((40, 60, 3), np.uint8)
        pixels[:, : 20 * (k + 1)] = (200, 40 + 80 * k, 30)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    return folder


def test_stage2_sequences_start_from_images(tmp_path):
    """With `start_images`, sequence i starts from the i-th image (cycling): its latent is the
    stream's frame 0 (the sink), the first window is [that latent, the last window - 1 new
    frames] with the image masked out of the loss, chunks start at frame 1, and training runs;
    the same run resumes with its sequence in flight exactly."""
    from utils.media import read_image

    images = _images(tmp_path / "images")
    overrides = dict(max_iters=5, log_iters=2, start_images=str(images))
    trainer = make_trainer(make_settings(tmp_path / "a", **overrides))
    seq = trainer._sequence()
    assert seq.state.prefix_frames == 1
    vae = trainer.vae()
    height, width = (8 * n for n in trainer.settings.latent_hw)  # the VAE stride
    expected = vae.encode(read_image(images / "0.png", height, width).to(vae.device))
    assert torch.equal(seq.previous[:1].float().cpu(), expected.to(seq.previous.dtype).float().cpu())
    window = seq.next_window(trainer.draws.rollout(0, "generator", [0]), grad=False)
    assert window.start_frame == 0 and window.latents.shape[1] == trainer.settings.streaming.window_frames
    assert torch.equal(window.latents[:, :1], expected.to(window.latents))
    assert not window.gradient_mask[:, 0].any() and window.gradient_mask[:, 1:].all()
    assert trainer.settings.streaming.start_image(3) == images / "1.png"

    a = make_trainer(make_settings(tmp_path / "run_a", **overrides))
    a.run()
    b1 = make_trainer(make_settings(tmp_path / "run_b", **overrides))
    b1.run(stop_after=3)
    del b1
    b2 = make_trainer(make_settings(tmp_path / "run_b", **overrides))
    assert b2.sequence is not None and b2.sequence.state.prefix_frames == 1
    b2.run()
    assert _same(_state(a), _state(b2)) == 0.0


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images"),
])
def test_bad_start_images_are_one_line(tmp_path, make, message):
    with pytest.raises(InputError, match=f"`start_images`: .*{message}"):
        make_settings(start_images=str(make(tmp_path)))
