"""The training script's clip augmentation keeps every label true; its concept loss.

Mirrored or reversed clips are relabelled (left <-> right, up <-> down,
growing <-> shrinking); the check reads the actor's own mask, augmented with
the same draws, and asserts that its motion still says the (new) action.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import script_module
import torch

from mmexplain.data import shapes as W

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes.py"


def load_script():
    return script_module.load_script("train_shapes.py", "train_shapes")


def motion(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """(dx, dy, area ratio) of a (T, H, W) mask from its first to its last frame, and its
    highest rise (the first frame's centroid row minus the smallest centroid row)."""
    ys, xs = torch.meshgrid(torch.arange(mask.shape[1]), torch.arange(mask.shape[2]),
                            indexing="ij")
    m = mask.float()
    area = m.sum(dim=(1, 2))
    cx, cy = (m * xs).sum(dim=(1, 2)) / area, (m * ys).sum(dim=(1, 2)) / area
    return (float(cx[-1] - cx[0]), float(cy[-1] - cy[0]), float(area[-1] / area[0]),
            float(cy[0] - cy.min()))


def test_augmented_clips_keep_their_labels_true() -> None:
    script = load_script()
    clips = W.ShapesWorld(seed=4).clip_batch(64, dtype=torch.uint8)
    videos, actions = script.augment_clips(clips.videos, clips.actions,
                                           torch.Generator().manual_seed(0))
    masks, same = script.augment_clips(clips.actor_masks[:, None], clips.actions,
                                       torch.Generator().manual_seed(0))
    assert torch.equal(same, actions)
    changed = (actions != clips.actions).sum()
    assert 10 < int(changed) < 54  # about half the clips change label
    mirrored = videos.flatten(1).ne(clips.videos.flatten(1)).any(1)
    assert int(mirrored.sum()) > 48  # and most are mirrored or reversed
    checked = set()
    for i, a in enumerate(W.ACTIONS[int(k)] for k in actions):
        mask = masks[i, 0]
        dx, dy, ratio, rise = motion(mask)
        expected = {"moving left": dx < -10, "moving right": dx > 10, "moving up": dy < -10,
                    "moving down": dy > 10, "growing": ratio > 2, "shrinking": ratio < 0.5,
                    "rotating": abs(dx) < 1 and abs(dy) < 1 and 0.8 < ratio < 1.25,
                    "bouncing": abs(dx) < 1 and abs(dy) < 1 and rise > 10}[a]
        assert expected, f"clip {i}: labelled {a!r}, its actor moved dx={dx:.1f}, dy={dy:.1f}, " \
                         f"area x{ratio:.2f}"
        checked.add(a)
        # the pixels moved with the mask: the actor's colour sits on its mask in frame 0
        colour = videos[i, :, 0][:, mask[0]].float().mean(dim=1)
        outside = videos[i, :, 0][:, ~mask[0]].float().mean(dim=1)
        assert (colour - outside).abs().max() > 20
    assert checked == set(W.ACTIONS)


def test_concept_loss_balances_on_and_off_cells_and_quiets_the_free_channels() -> None:
    """The C3D's concept supervision (conv3b's first channels = the actor's mask per action)."""
    script = load_script()
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, 1, 1], target[0, 1, 2, 3] = 1.0, 0.5
    acts = torch.zeros(1, 5, 4, 4)
    acts[0, 2:] = 0.25  # free channels
    # all concept channels off: on-error = (1*1 + 0.5*0.25) / 1.5, off-error = 0.5*0.25 / 30.5
    want = (1.0 + 0.125) / 1.5 + 0.125 / 30.5 + script.CONCEPT_QUIET * 0.25
    assert abs(float(script.concept_loss(acts, target)) - want) < 1e-6
    acts[0, :2] = target[0]
    assert abs(float(script.concept_loss(acts, target)) - script.CONCEPT_QUIET * 0.25) < 1e-6


def test_masks_riding_as_a_fourth_channel_are_mirrored_with_their_clip() -> None:
    """train_c3d augments clip and actor mask as one (N, 4, T, H, W) tensor: the same as
    augmenting each with the same draws, so the concept target stays on the actor."""
    script = load_script()
    clips = W.ShapesWorld(seed=4).clip_batch(16, dtype=torch.uint8)
    both = torch.cat([clips.videos, clips.actor_masks[:, None].to(torch.uint8)], 1)
    joint, actions = script.augment_clips(both, clips.actions, torch.Generator().manual_seed(3))
    masks, same = script.augment_clips(clips.actor_masks[:, None], clips.actions,
                                       torch.Generator().manual_seed(3))
    assert torch.equal(actions, same) and (actions != clips.actions).any()
    assert torch.equal(joint[:, 3:].bool(), masks)


def test_training_gradcam_is_the_engines_gradcam() -> None:
    """The explanation supervision trains the map the engine computes: the script's
    differentiable map (mmexplain.distill.maps_at, the one implementation) equals
    mx.GradCAM on the same model, layer and target (the shapes C3D at conv3b), and it is
    differentiable with respect to the layers after conv3b too."""
    import mmexplain as mx
    from mmexplain.adapters.c3d import C3D

    script = load_script()
    assert not hasattr(script, "gradcam_map")  # no second implementation in the script
    torch.manual_seed(0)
    model = C3D(**script.C3D_CONFIG).eval()
    clips = torch.randn(2, 3, 16, 64, 64)
    target = torch.tensor([3, 5])
    acts = {}
    hook = model.conv3b.register_forward_hook(lambda m, a, o: acts.__setitem__("a", o))
    logits = model(clips)
    explained = script.maps_at(acts["a"], logits.gather(1, target[:, None])[:, 0])
    hook.remove()
    want = mx.GradCAM(model, layer="conv3b")(clips, target=target[:, None]).maps[:, 0]
    assert explained.shape == want.shape == (2, 8, 16, 16)
    assert (want == 0).any() and (want > 0).any()  # the ReLU matters here
    torch.testing.assert_close(explained.detach(), want, rtol=1e-4,
                               atol=1e-6 * float(want.max()))
    after = dict(model.named_parameters())[next(n for n, _ in model.named_parameters()
                                               if n.startswith("conv4"))]
    grad = torch.autograd.grad(explained.sum(), after)[0]  # through dS/dA: create_graph
    assert float(grad.abs().max()) > 0


def test_pointing_loss_is_zero_on_the_object_and_pays_for_a_peak_off_it() -> None:
    script = load_script()
    cover = torch.zeros(1, 4, 4)
    cover[0, 1, 1], cover[0, 1, 2] = 1.0, 0.5  # the object: a full and a half cell
    on_object = torch.zeros(1, 4, 4)
    on_object[0, 1, 1] = on_object[0, 1, 2] = 3.0  # any scale: the map is divided by its max
    on_object[0, 3, 3] = -2.0  # negative evidence is clipped (the map's ReLU)
    assert float(script.pointing_loss(on_object, cover)) < 1e-6
    # the peak off the object: on-cells at 1/2 and 1/4 of it, one off-cell at the max
    off_peak = torch.zeros(1, 4, 4)
    off_peak[0, 1, 1], off_peak[0, 1, 2], off_peak[0, 0, 0] = 2.0, 1.0, 4.0
    on_term = (1.0 * 0.5 ** 2 + 0.5 * 0.75 ** 2) / 1.5
    off_term = 1.0 / 14  # 14 cells the object does not touch, one of them at 1
    assert abs(float(script.pointing_loss(off_peak, cover)) - (on_term + off_term)) < 1e-5
    # clips: every frame is its own map (space_dims=2 over (T, H, W))
    frames = torch.stack([on_object, off_peak], 1)  # (1, 2, 4, 4)
    covers = torch.stack([cover, cover], 1)
    assert abs(float(script.pointing_loss(frames, covers)) - (on_term + off_term) / 2) < 1e-5


def test_object_cover_is_the_share_of_each_cell_the_chosen_objects_cover() -> None:
    script = load_script()
    masks = torch.zeros(1, 3, 64, 64, dtype=torch.bool)
    masks[0, 0, 0:8, 0:6] = True  # chosen: 2 cells full in y, 1.5 cells in x
    masks[0, 1, 40:48, 40:48] = True  # not chosen
    masks[0, 2, 60:64, 62:64] = True  # chosen: half of one cell's width, all its height
    cover = script.object_cover(masks, torch.tensor([[True, False, True]]), (16, 16))
    want = torch.zeros(1, 16, 16)
    want[0, 0:2, 0] = 1.0
    want[0, 0:2, 1] = 0.5
    want[0, 15, 15] = 0.5
    torch.testing.assert_close(cover, want)


def test_one_trunk_pass_gives_the_pooled_codes_and_the_stored_maps() -> None:
    """pooled_codes with ``store`` returns what two separate passes gave: the pooled codes
    of every image and the float16 conv2 maps of the first ``stored`` (a partial chunk
    included), bit for bit."""
    from mmexplain.adapters.captioner import ShowTell
    from mmexplain.adapters.shapes import shapes_trunk

    script = load_script()
    torch.manual_seed(0)
    channels = (4, 6, 8, 8)
    model = ShowTell(W.CAPTION_VOCAB, trunk=shapes_trunk(channels), trunk_channels=channels,
                     normalize=None, hidden_size=8, embed_size=8).eval()
    images = torch.rand(7, 3, 64, 64)
    codes, stored = script.pooled_codes(model, images, chunk=3, store="conv2", stored=5)
    with torch.no_grad():
        want_codes = torch.cat([model.pool(model.feature_map(images[i:i + 3]))
                                for i in range(0, 7, 3)])
        want_maps = torch.cat([model.feature_map(images[i:i + 3], stop="conv2")
                               for i in range(0, 7, 3)])[:5].half()
    assert stored.dtype == torch.float16 and stored.shape == (5, 6, 32, 32)
    assert torch.equal(stored, want_maps) and torch.equal(codes, want_codes)
    plain, none = script.pooled_codes(model, images, chunk=3)
    assert none is None and torch.equal(plain, want_codes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_the_script_reruns_itself_with_malloc_keeping_its_memory(tmp_path: Path) -> None:
    """reuse_memory re-executes the script once under MALLOC_ENV (glibc reads it only at
    start-up); the second run finds it set and goes on."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print('start', flush=True)\n"
        "m.reuse_memory()\n"
        "print(*(os.environ[k] for k in m.MALLOC_ENV))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    script = load_script()
    assert out[:3] == ["start", "start", " ".join(script.MALLOC_ENV.values())]


def test_fit_runs_the_steps_asked_across_epochs_in_the_epochs_order() -> None:
    """fit(steps=5) on 10 samples in batches of 4 (2 per epoch) takes 5 batches: the first
    5 of batches() over 3 epochs, in order; epochs and steps together are refused."""
    script = load_script()
    model = torch.nn.Linear(2, 1)
    seen: list[torch.Tensor] = []

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx)
        return model(torch.ones(len(idx), 2)).sum()

    script.fit(model, loss_of, 10, steps=5, batch=4, lr=1e-3, seed=3, name="t")
    want = list(script.batches(10, 4, 3, 3))[:5]
    assert len(seen) == 5 and all(torch.equal(a, b) for a, b in zip(seen, want))
    with pytest.raises(TypeError, match="epochs or steps, not both"):
        script.fit(model, loss_of, 10, epochs=1, steps=5, batch=4, lr=1e-3, seed=3, name="t")
