"""The training script's clip augmentation keeps every label true; its concept loss.

Mirrored or reversed clips are relabelled (left <-> right, up <-> down,
growing <-> shrinking); the check reads the actor's own mask, augmented with
the same draws, and asserts that its motion still says the (new) action.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mmexplain.data import shapes as W

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
