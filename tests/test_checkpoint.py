"""Checkpoints: official GRMP-IQA state dicts and our own, converted with every tensor accounted for."""
import copy

import pytest
import torch

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, tiny_model_kwargs
from official_grmp_reference import OfficialCustomCLIP, perturb_1d_parameters
from pyiqa_grmp.archs.checkpoint import CheckpointMismatchError
from pyiqa_grmp.archs.grmp_arch import GRMPIQA

N_CTX = 4


def _official_model(seed: int = 0) -> OfficialCustomCLIP:
    import open_clip

    torch.manual_seed(seed)
    token_ids = open_clip.tokenizer.SimpleTokenizer()(['X X X X high quality.', 'X X X X low quality.'])
    model = OfficialCustomCLIP(TINY_BACKBONE, TINY_NUM_PROMPTS, N_CTX, token_ids)
    perturb_1d_parameters(model, seed)
    return model.eval()


def _ours_from(path, **overrides) -> GRMPIQA:
    kwargs = tiny_model_kwargs(pretrained=True, pretrained_model_path=str(path))
    kwargs.update(overrides)
    return GRMPIQA(**kwargs).eval()


WRAPPERS = {
    'bare': lambda sd: sd,
    'module_prefix': lambda sd: {f'module.{k}': v for k, v in sd.items()},
    'nested_state_dict_with_metadata': lambda sd: {'state_dict': sd, 'epoch': 3},
    'nested_model_with_prefix': lambda sd: {'model': {f'module.{k}': v for k, v in sd.items()}},
    'nested_params': lambda sd: {'params': sd},
}


@pytest.mark.parametrize('wrapper', sorted(WRAPPERS))
def test_official_checkpoint_scores_like_the_official_model(tmp_path, wrapper):
    official = _official_model()
    state = official.state_dict()
    assert len(state) == len(set(state))
    path = tmp_path / 'official.pt'
    torch.save(WRAPPERS[wrapper](state), path)
    ours = _ours_from(path)
    stored_244 = torch.rand(3, 3, 244, 244)
    official_input = (stored_244[:, :, 10:234, 10:234] - ours.pixel_mean) / ours.pixel_std
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(ours.preprocess(stored_244)),
                              official.image_features(official_input), atol=1e-5)
        assert torch.allclose(ours(stored_244).flatten(), official(official_input), atol=1e-5)


def test_official_keys_are_all_accounted_for(tmp_path):
    official = _official_model()
    path = tmp_path / 'official.pt'
    torch.save(official.state_dict(), path)
    ours = _ours_from(path)
    # 6 VPT + ctx + 2 prompt buffers on the official side; the two prompt sets are stacked in ours and the
    # buffers are derived, so ours has exactly 3 keys fewer, all of them learned tensors.
    assert len(official.state_dict()) - len(ours.state_dict()) == 3
    for key, value in official.state_dict().items():
        if key.startswith('text_encoder.'):
            assert torch.equal(ours.state_dict()['clip.' + key[len('text_encoder.'):]], value)


def test_official_pretrain_checkpoint_without_token_embedding_needs_base_weights(tmp_path):
    official = _official_model()
    state = {k: v for k, v in official.state_dict().items() if k != 'text_encoder.token_embedding.weight'}
    path = tmp_path / 'best_prompt.pt'
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match='clip.token_embedding.weight'):
        _ours_from(path)
    # With the base CLIP it came from, the token embedding is filled in and the scores match.
    base = make_tiny_model().clip.state_dict()
    base['token_embedding.weight'] = official.text_encoder.token_embedding.weight.detach().clone()
    base_path = tmp_path / 'base_clip.pt'
    torch.save(base, base_path)
    ours = _ours_from(path, backbone_pretrained=str(base_path))
    image = torch.rand(1, 3, 244, 244)
    official_input = (image[:, :, 10:234, 10:234] - ours.pixel_mean) / ours.pixel_std
    with torch.no_grad():
        assert torch.allclose(ours(image).flatten(), official(official_input), atol=1e-5)


def test_official_prompt_buffers_must_match_the_class_prompts(tmp_path):
    path = tmp_path / 'official.pt'
    torch.save(_official_model().state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match='token_prefix|token_suffix'):
        _ours_from(path, class_names=('good photo', 'bad photo'))


def test_unknown_official_key_is_reported(tmp_path):
    state = _official_model().state_dict()
    state['prompt_learner3.ctx'] = torch.zeros(4, 32)
    path = tmp_path / 'official.pt'
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match='prompt_learner3.ctx'):
        _ours_from(path)


def test_own_checkpoint_loads_identically(tiny_checkpoint):
    expected = make_tiny_model(seed=3)
    loaded = _ours_from(tiny_checkpoint)
    images = torch.rand(2, 3, 200, 200)
    with torch.no_grad():
        assert torch.equal(loaded(images), expected(images))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = make_tiny_model().state_dict()
    state.pop('prompt_learner.ctx')
    state['visual_prompts.extra'] = torch.zeros(1)
    path = tmp_path / 'broken.pth'
    torch.save({'params': state}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        _ours_from(path)
    assert 'missing keys (1): prompt_learner.ctx' in str(error.value)
    assert 'unexpected keys (1): visual_prompts.extra' in str(error.value)


def test_shape_mismatch_is_named(tiny_checkpoint):
    with pytest.raises(CheckpointMismatchError, match=r'visual_prompts.embeddings: checkpoint \(2, 5, 64\)'):
        _ours_from(tiny_checkpoint, num_visual_prompts=7)


def test_partial_backbone_is_refused_not_filled(tmp_path):
    state = make_tiny_model().state_dict()
    state.pop('clip.visual.ln_post.weight')
    path = tmp_path / 'partial.pth'
    torch.save({'params': state}, path)
    with pytest.raises(CheckpointMismatchError, match='clip.visual.ln_post.weight'):
        _ours_from(path, backbone_pretrained='openai')


def test_prompt_only_checkpoint_takes_the_backbone_from_base_weights(tmp_path):
    model = make_tiny_model(seed=5)
    prompts = {k: v for k, v in model.state_dict().items() if not k.startswith('clip.')}
    prompt_path, base_path = tmp_path / 'prompts.pth', tmp_path / 'clip.pt'
    torch.save({'params': prompts}, prompt_path)
    torch.save(model.clip.state_dict(), base_path)
    loaded = _ours_from(prompt_path, backbone_pretrained=str(base_path))
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_corrupt_file_fails_naming_the_path(tmp_path):
    path = tmp_path / 'corrupt.pth'
    path.write_bytes(b'this is not a checkpoint')
    with pytest.raises(CheckpointMismatchError, match='could not read GRMP-IQA checkpoint .*corrupt.pth'):
        _ours_from(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / 'pickle.pth'
    torch.save({'params': make_tiny_model().state_dict(), 'opt': copy.copy(object())}, path)
    with pytest.raises(CheckpointMismatchError, match='could not read'):
        _ours_from(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        _ours_from(tmp_path / 'nowhere.pth')


def test_pretrained_false_loads_nothing(monkeypatch):
    import pyiqa_grmp.archs.grmp_arch as arch

    def forbidden(*args, **kwargs):
        raise AssertionError('no checkpoint may be read with pretrained=False')

    monkeypatch.setattr(arch, 'read_grmp_checkpoint', forbidden)
    monkeypatch.setattr(arch, 'resolve_weights', forbidden)
    GRMPIQA(**tiny_model_kwargs())


def test_backbone_of_a_grmp_checkpoint_is_taken_without_its_prompts(tiny_checkpoint):
    source = torch.load(tiny_checkpoint, weights_only=True)['params']
    torch.manual_seed(7)
    model = GRMPIQA(**tiny_model_kwargs(backbone_pretrained=tiny_checkpoint))
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, source[f'clip.{key}']), key
    assert not torch.equal(model.prompt_learner.ctx, source['prompt_learner.ctx'])


def test_backbone_checkpoint_of_another_shape_names_the_keys(tiny_checkpoint):
    other = copy.deepcopy(TINY_BACKBONE)
    other['vision_cfg']['width'] = 32
    with pytest.raises(CheckpointMismatchError, match=r'shape mismatches .*clip\.visual'):
        GRMPIQA(**tiny_model_kwargs(backbone=other, backbone_pretrained=tiny_checkpoint))


# ------------------------------------------------------------------------------ whole pickled modules
GHOST_MODULE = 'grmp_official_ghost'


def _pickle_whole_without_its_classes(model: torch.nn.Module, path, wrap_in_module: bool = False) -> None:
    """``torch.save(model)`` with the model's own classes defined only here, then made unimportable.

    Each class of the reference model is re-declared in a throwaway module (as the official code's classes
    would be), the model is saved whole, and the throwaway module is removed from ``sys.modules``.
    """
    import sys
    import types

    import official_grmp_reference as reference

    ghost = types.ModuleType(GHOST_MODULE)
    own = {cls for cls in vars(reference).values() if isinstance(cls, type) and cls.__module__ == reference.__name__}
    for cls in own:
        setattr(ghost, cls.__name__, type(cls.__name__, (cls,), {'__module__': GHOST_MODULE}))
    for module in model.modules():
        if type(module) in own:
            module.__class__ = getattr(ghost, type(module).__name__)
    root = model
    if wrap_in_module:  # as DataParallel / DDP would: the model under ``module``
        ghost.Wrapper = type('Wrapper', (torch.nn.Module,), {'__module__': GHOST_MODULE})
        root = ghost.Wrapper()
        root.module = model
    sys.modules[GHOST_MODULE] = ghost
    try:
        torch.save(root, path)
    finally:
        del sys.modules[GHOST_MODULE]


@pytest.mark.parametrize('form', ['fp32', 'fp16_wrapped'])
def test_pickled_official_module_scores_exactly_like_its_state_dict(tmp_path, form):
    official = _official_model()
    if form == 'fp16_wrapped':
        official = official.half()
    state_path, module_path = tmp_path / 'state.pt', tmp_path / 'model.pt'
    torch.save(official.state_dict(), state_path)
    _pickle_whole_without_its_classes(official, module_path, wrap_in_module=form == 'fp16_wrapped')
    with pytest.raises((ModuleNotFoundError, AttributeError), match=GHOST_MODULE):
        torch.load(module_path, weights_only=False)  # the classes are gone: a plain torch.load cannot open it
    from_state, from_module = _ours_from(state_path), _ours_from(module_path)
    images = torch.rand(3, 3, 244, 244)
    with torch.no_grad():
        assert torch.equal(from_module(images), from_state(images))
    for key, value in from_state.state_dict().items():
        assert torch.equal(from_module.state_dict()[key], value), key


def test_pickled_module_reports_its_class(tmp_path):
    from pyiqa_grmp.archs.checkpoint import read_grmp_checkpoint

    path = tmp_path / 'model.pt'
    _pickle_whole_without_its_classes(_official_model(), path)
    checkpoint = read_grmp_checkpoint(str(path))
    assert checkpoint.source == 'official'
    assert checkpoint.container == f'pickled module {GHOST_MODULE}.OfficialCustomCLIP'


class _RunsCode:
    """Unpickling this would run ``command`` (a ``__reduce__`` to ``os.system`` or ``exec``)."""

    def __init__(self, how: str, marker) -> None:
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        import os

        if self.how == 'os.system':
            return os.system, (f'touch {self.marker}',)
        return exec, (f'open({self.marker!r}, "w").close()',)


@pytest.mark.parametrize('how', ['os.system', 'exec'])
@pytest.mark.parametrize('where', ['root', 'inside_module'])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how, where):
    import pickle

    pickle.loads(pickle.dumps(_RunsCode(how, tmp_path / 'live')))
    assert (tmp_path / 'live').exists()  # the payload is live: a plain unpickler runs it
    marker = tmp_path / 'marker'
    payload = _RunsCode(how, marker)
    path = tmp_path / 'evil.pt'
    if where == 'root':
        torch.save(payload, path)
    else:
        model = make_tiny_model()
        model.payload = payload
        torch.save(model, path)
    called = 'posix.system' if how == 'os.system' else 'builtins.exec'
    with pytest.raises(CheckpointMismatchError, match=rf'calls {called}.*not allowed.*Nothing in the file was '
                                                      'executed'):
        _ours_from(path)
    assert not marker.exists()


def test_pickled_module_of_our_own_model_loads_identically(tmp_path):
    model = make_tiny_model(seed=4)
    path = tmp_path / 'whole.pth'
    torch.save(model, path)
    loaded = _ours_from(path)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
