"""GRMPIQA: preprocessing, output contract, fast path vs reference, eval-time caches, input errors."""
import math

import pytest
import torch

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo_tensor, reference_score


def test_rgb_batch_gives_n_by_1_scores_in_unit_interval(tiny_model):
    with torch.no_grad():
        scores = tiny_model(torch.rand(3, 3, 300, 200))
    assert scores.shape == (3, 1)
    assert scores.dtype == torch.float32
    assert ((scores > 0) & (scores < 1)).all()


def test_grey_input_scores_like_its_rgb_repeat(tiny_model):
    grey = torch.rand(2, 1, 128, 160)
    with torch.no_grad():
        assert torch.allclose(tiny_model(grey), tiny_model(grey.repeat(1, 3, 1, 1)), atol=1e-6)


@pytest.mark.parametrize('size', [(8, 8), (244, 244), (37, 1000), (3000, 2000)])
def test_any_input_size_is_scored(tiny_model, size):
    with torch.no_grad():
        scores = tiny_model(torch.rand(1, 3, *size))
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()


def test_preprocess_crops_the_centre_at_offset_10_of_a_244_resize(tiny_model):
    stored = torch.rand(2, 3, 244, 244)
    expected = (stored[:, :, 10:234, 10:234] - tiny_model.pixel_mean) / tiny_model.pixel_std
    assert torch.equal(tiny_model.preprocess(stored), expected)


def test_preprocess_resizes_bicubic_without_keeping_aspect(tiny_model):
    image = torch.rand(1, 3, 100, 300)
    resized = torch.nn.functional.interpolate(image, size=(244, 244), mode='bicubic', align_corners=False)
    expected = (resized[:, :, 10:234, 10:234] - tiny_model.pixel_mean) / tiny_model.pixel_std
    assert torch.allclose(tiny_model.preprocess(image), expected, atol=1e-6)


def _window_offset(image, crop):
    """(top, left) of the window of ``image`` equal to ``crop`` (within float noise), or None."""
    size = crop.shape[-1]
    corners = image[:, :image.shape[1] - size + 1, :image.shape[2] - size + 1]
    candidates = ((corners - crop[:, 0, 0, None, None]).abs().amax(dim=0) < 1e-5).nonzero().tolist()
    for top, left in candidates:
        if (image[:, top:top + size, left:left + size] - crop).abs().max() < 1e-5:
            return top, left
    return None


def test_training_crop_is_a_random_window_of_the_resize_possibly_flipped(tiny_model):
    torch.manual_seed(0)
    stored = torch.rand(16, 3, 244, 244)
    crops = tiny_model.preprocess(stored, random_crop=True) * tiny_model.pixel_std + tiny_model.pixel_mean
    assert crops.shape == (16, 3, 224, 224)
    offsets, flipped = set(), 0
    for image, crop in zip(stored, crops):
        for candidate, was_flipped in ((crop, False), (crop.flip(-1), True)):
            offset = _window_offset(image, candidate)
            if offset is not None:
                offsets.add(offset)
                flipped += was_flipped
                break
        else:
            raise AssertionError('crop is not a window of the resized image')
    assert len(offsets) > 1 and 0 < flipped < 16


def test_eval_mode_never_augments(tiny_model):
    images = torch.rand(2, 3, 244, 244)
    with torch.no_grad():
        assert torch.equal(tiny_model(images), tiny_model(images))


def test_preprocess_uses_imagenet_statistics(tiny_model):
    assert torch.allclose(tiny_model.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(tiny_model.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_fast_path_equals_reference_scores(tiny_model):
    images = torch.cat([photo_tensor('astronaut', (256, 256)), photo_tensor('coffee', (256, 256))])
    with torch.no_grad():
        fast = tiny_model(images)
        reference = reference_score(tiny_model, images)
    assert torch.allclose(fast, reference, atol=1e-6)


def test_fast_path_equals_reference_gradients_in_training_mode():
    model = make_tiny_model(prompt_dropout=0.0, augment=False).train()
    images = torch.rand(2, 3, 244, 244)
    target = torch.tensor([[0.2], [0.9]])

    def gradients(score_fn):
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy(score_fn(images), target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = gradients(model)
    reference = gradients(lambda x: reference_score(model, x))
    assert fast.keys() == reference.keys()
    assert 'visual_prompts.embeddings' in fast and 'prompt_learner.ctx' in fast
    for name in fast:
        scale = reference[name].abs().max().clamp_min(1e-12)
        assert (fast[name] - reference[name]).abs().max() / scale < 1e-4, name


def test_prompt_dropout_draws_a_mask_per_sample_in_training():
    model = make_tiny_model(prompt_dropout=0.5).train()
    tokens = model.visual_prompts.tokens(0, batch_size=4)
    assert tokens.shape == (4, TINY_NUM_PROMPTS, TINY_BACKBONE['vision_cfg']['width'])
    assert not torch.equal(tokens[0] == 0, tokens[1] == 0)


def test_scene_logits_have_one_column_per_scene(tiny_model):
    with torch.no_grad():
        score, scene_logits = tiny_model(torch.rand(2, 3, 244, 244), return_scene_logits=True)
    assert score.shape == (2, 1)
    assert scene_logits.shape == (2, 9)


def test_logit_scale_comes_from_the_weights(tiny_model):
    images = torch.rand(2, 3, 244, 244)
    with torch.no_grad():
        tiny_model.clip.logit_scale.fill_(math.log(100.0))
        image_features = tiny_model.encode_image(tiny_model.preprocess(images))
        expected = (100.0 * image_features @ tiny_model.quality_text_features().t()).softmax(-1)[:, :1]
        assert torch.allclose(tiny_model(images), expected, atol=1e-6)
        tiny_model.clip.logit_scale.fill_(math.log(10.0))
        assert not torch.allclose(tiny_model(images), expected, atol=1e-4)


def _count_text_encodings(model, monkeypatch):
    calls = []
    original = model._encode_text_embeddings

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(model, '_encode_text_embeddings', counting)
    return calls


def test_text_features_are_computed_once_in_eval(tiny_model, monkeypatch):
    calls = _count_text_encodings(tiny_model, monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            tiny_model(torch.rand(2, 3, 64, 64))
    assert len(calls) == 1


def test_text_features_are_recomputed_every_call_in_training(tiny_model, monkeypatch):
    tiny_model.train()
    calls = _count_text_encodings(tiny_model, monkeypatch)
    for _ in range(2):
        tiny_model(torch.rand(2, 3, 64, 64))
    assert len(calls) == 2


def _fresh_copy(model):
    copy = make_tiny_model()
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def test_optimizer_step_invalidates_eval_caches(tiny_model):
    images = torch.rand(2, 3, 244, 244)
    with torch.no_grad():
        before = tiny_model(images)
    optimizer = torch.optim.SGD([tiny_model.prompt_learner.ctx, tiny_model.visual_prompts.embeddings], lr=10.0)
    loss = tiny_model.quality_text_features().sum() + tiny_model.visual_prompts.tokens(0).sum()  # grads enabled
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = tiny_model(images)
        expected = _fresh_copy(tiny_model)(images)
    assert not torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(after, expected, atol=1e-6)


def test_load_state_dict_invalidates_eval_caches(tiny_model):
    images = torch.rand(2, 3, 244, 244)
    other = make_tiny_model(seed=7)
    with torch.no_grad():
        tiny_model(images)
        tiny_model.load_state_dict(other.state_dict())
        assert torch.allclose(tiny_model(images), other(images), atol=1e-6)


def test_train_mode_clears_eval_caches(tiny_model):
    with torch.no_grad():
        tiny_model(torch.rand(1, 3, 64, 64))
    assert tiny_model._constants
    tiny_model.train()
    assert not tiny_model._constants


def test_caches_built_in_inference_mode_do_not_break_autograd_later(tiny_model):
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        tiny_model(images)
    images.requires_grad_(True)
    with torch.no_grad():
        tiny_model(images)  # reuses the cache built in inference mode
    tiny_model.requires_grad_(False)
    tiny_model(images).sum().backward()  # eval + grad mode: cache used, gradients to the input
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_dtype_change_is_followed(tiny_model):
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        single = tiny_model(images)
        double = tiny_model.double()(images)
    assert double.dtype == torch.float64
    assert torch.allclose(single.double(), double, atol=1e-5)


@pytest.mark.parametrize('bad, message', [
    (torch.full((1, 3, 32, 32), float('nan')), 'NaN or Inf'),
    (torch.full((1, 3, 32, 32), float('inf')), 'NaN or Inf'),
    (torch.rand(3, 32, 32), '4-D'),
    (torch.rand(1, 1, 3, 32, 32), '4-D'),
    (torch.rand(1, 2, 32, 32), 'channels'),
    (torch.rand(1, 3, 0, 32), 'empty'),
])
def test_bad_tensor_gives_a_clear_error(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(bad)


def test_crop_must_match_backbone_input_size():
    with pytest.raises(ValueError, match='crop'):
        make_tiny_model(resize=300, crop=256)


def test_plain_vit_features_equal_open_clip_image_features_within_1e_5(tiny_model):
    from pyiqa_grmp.archs.grmp_arch import vit_features

    pixels = tiny_model.preprocess(torch.rand(3, 3, 250, 230, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.allclose(vit_features(tiny_model.clip.visual, pixels), tiny_model.clip.visual(pixels),
                              rtol=0, atol=1e-5)


def test_scene_teacher_gives_the_zero_shot_scene_logits_of_the_plain_clip(tiny_model):
    import torch.nn.functional as F

    from pyiqa_grmp.models.finetune_model import SceneTeacher

    clip = tiny_model.clip
    pixels = tiny_model.preprocess(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tiny_model.scene_token_ids), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.visual(pixels), dim=-1) @ text.t()
        assert torch.allclose(SceneTeacher(tiny_model)(pixels), expected, rtol=0, atol=1e-4)


def _front_runs(model):
    """A counter of the runs of the front: the patch embedding starts it."""
    runs = []
    model.clip.visual.conv1.register_forward_hook(lambda *args: runs.append(1))
    return runs


def _with_frozen_front(seed: int = 0):
    model = make_tiny_model(seed=seed)
    model.requires_grad_(False)
    model.clip.visual.transformer.resblocks[-1].requires_grad_(True)  # fine-tuning: the last block trains
    return model


def test_a_remembered_front_gives_the_scores_bit_for_bit_and_runs_once_per_batch():
    model, plain = _with_frozen_front(), _with_frozen_front()
    model.remember_frozen_front()
    images = torch.rand(3, 3, 230, 250, generator=torch.Generator().manual_seed(2))
    runs = _front_runs(model)
    with torch.no_grad():
        scores = [model(images) for _ in range(3)]
        expected = plain(images)
    assert all(torch.equal(s, expected) for s in scores)
    assert len(runs) == 1


def test_a_changed_front_weight_or_a_trainable_front_is_never_served_from_memory():
    model, plain = _with_frozen_front(), _with_frozen_front()
    model.remember_frozen_front()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(images)
        for net in (model, plain):
            net.clip.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)  # an in-place edit of the front
        assert torch.equal(model(images), plain(images))
    model.visual_prompts.requires_grad_(True)  # meta-training: the prompts of every block train
    runs = _front_runs(model)
    with torch.no_grad():
        model(images)
        model(images)
    assert len(runs) == 2
