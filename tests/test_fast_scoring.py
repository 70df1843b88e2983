"""Scoring at the hardware's pace: the exact resize from the taps alone, batches collated in the workers, GPU JPEG
decoding (its file triage, orientation and assembly, exercised with torchvision's CPU decoder), bf16 detection.
The tests marked gpu run the real nvJPEG path (skipped without CUDA)."""
import warnings

import numpy as np
import pyiqa
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo
from pyiqa_grmp import precision, scoring
from pyiqa_grmp.api import _fast_settings, score
from pyiqa_grmp.data.image_io import ImageReadError, unit_float
from pyiqa_grmp.data.transforms import SquareResize, squash_bicubic
from pyiqa_grmp.errors import InvalidArgument
from pyiqa_grmp.scoring import gpu_decode, pipeline
from pyiqa_grmp.scoring.gpu_decode import gpu_plan, orient, torchvision_decoder


def _reference(image: torch.Tensor, size: int = 244) -> torch.Tensor:
    """Today's path: the float image, then F.interpolate (what GRMPIQA.preprocess runs)."""
    return F.interpolate(unit_float(image).unsqueeze(0), size=(size, size), mode='bicubic', align_corners=False)[0]


# ------------------------------------------------------------------------------------------- the exact resize
@pytest.mark.parametrize('height, width', [(1, 1), (2, 3), (37, 53), (244, 100), (245, 243), (4000, 7),
                                           (975, 977), (1200, 1600), (1536, 2048),  # rows first
                                           (5, 4000), (2000, 3000), (1000, 9000)])  # columns first
def test_squash_from_the_taps_equals_interpolate_within_1e_6(height, width):
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(height * 7 + width)).permute(2, 0, 1)
    assert (squash_bicubic(image, 244) - _reference(image)).abs().max().item() <= 1e-6


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 700), width=st.integers(1, 700), size=st.integers(1, 300),
       channels=st.sampled_from([1, 3]), sixteen_bit=st.booleans(), channels_last=st.booleans())
def test_squash_of_grey_16_bit_and_any_layout_equals_interpolate_within_1e_6(height, width, size, channels,
                                                                               sixteen_bit, channels_last):
    generator = torch.Generator().manual_seed(height * 1000 + width)
    if sixteen_bit:  # decoded 16-bit files are float32 in [0, 1]
        image = torch.randint(0, 65536, (channels, height, width), generator=generator).float() / 65535.0
    else:
        image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)
    if channels_last:
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert (squash_bicubic(image, size) - _reference(image, size)).abs().max().item() <= 1e-6


def test_resize_decoded_of_a_photo_equals_the_declared_resize_within_1e_6():
    resize = SquareResize(244)
    large = torch.from_numpy(np.ascontiguousarray(np.tile(photo('astronaut'), (3, 2, 1)))).permute(2, 0, 1)
    for image in (large, large[:, :300, :400]):
        assert (resize.resize_decoded(image) - resize(unit_float(image)[None])[0]).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------- batches from the workers
@pytest.fixture(scope='module')
def tiny_metric(tiny_checkpoint):
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                               backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)


@pytest.fixture(scope='module')
def kinds(tmp_path_factory):
    """One file of each kind the GPU triage tells apart, made from the bundled photos."""
    folder = tmp_path_factory.mktemp('kinds')
    rgb = photo('astronaut')[:192, :256]
    files = {}

    def save(name, image, **options):
        files[name] = str(folder / name)
        image.save(files[name], **options)

    save('baseline.jpg', Image.fromarray(rgb), quality=90)
    save('grey.jpg', Image.fromarray(photo('camera')[:160, :200]), quality=90)
    save('cmyk.jpg', Image.fromarray(rgb).convert('CMYK'), quality=90)
    save('progressive.jpg', Image.fromarray(photo('coffee')[:200, :180]), quality=90, progressive=True)
    save('photo.png', Image.fromarray(photo('chelsea')[:150, :170]))
    save('photo.webp', Image.fromarray(rgb), quality=90)
    save('sixteen.png', Image.fromarray((photo('camera')[:100, :120].astype(np.uint16) * 257)))
    exif = Image.Exif()
    exif[0x0112] = 6
    save('rotated.jpg', Image.fromarray(photo('rocket')[:120, :200]), quality=90, exif=exif)
    whole = open(files['baseline.jpg'], 'rb').read()
    files['truncated.jpg'] = str(folder / 'truncated.jpg')
    open(files['truncated.jpg'], 'wb').write(whole[:len(whole) // 2])
    return files


def test_file_triage_sends_each_kind_where_it_belongs(kinds):
    plans = {name: gpu_plan(open(path, 'rb').read()) for name, path in kinds.items()}
    on_gpu = {name for name, plan in plans.items() if plan.on_gpu}
    assert on_gpu == {'baseline.jpg', 'grey.jpg', 'progressive.jpg', 'rotated.jpg'}
    assert plans['rotated.jpg'].orientation == 6 and plans['baseline.jpg'].orientation == 1
    assert plans['photo.png'].reason == plans['photo.webp'].reason == plans['sixteen.png'].reason == 'not a JPEG'
    assert 'components' in plans['cmyk.jpg'].reason or 'Adobe' in plans['cmyk.jpg'].reason
    assert 'truncated' in plans['truncated.jpg'].reason


@pytest.mark.parametrize('orientation', range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    oriented = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert oriented.shape == expected.shape and (oriented == expected).all()


def test_batched_path_gives_the_scores_of_the_per_image_path_bit_for_bit(kinds, tiny_metric):
    paths = sorted(kinds.values())
    metrics, views = {'grmp_iqa': tiny_metric}, {'grmp_iqa': 0}
    resizes = [scoring.declared_resize(tiny_metric)]
    batched = [r for chunk in scoring.score_stream(paths, metrics, batch_size=4, workers=2) for r in chunk]
    items = list(scoring.prepared_items(paths, resizes, False, workers=0))
    single = [r for start in range(0, len(items), 4)
              for r in pipeline._score_chunk(items[start:start + 4], metrics, views)]
    assert [(r.path, r.scores) for r in batched] == [(r.path, r.scores) for r in single]
    assert [[f.reason for f in r.errors] for r in batched] == [[f.reason for f in r.errors] for r in single]
    assert sum(bool(r.errors) for r in batched) == 1  # the truncated file, by name
    assert 'truncated.jpg' in next(r for r in batched if r.errors).errors[0].reason


def _views_by_path(batches):
    return {i.path: (i.error, None if i.error else b.pixels[0][i.views[0]]) for b in batches for i in b.items}


def test_gpu_decoding_assembles_views_in_order_with_cpu_fallbacks(kinds):
    paths = sorted(kinds.values())
    resizes = [SquareResize(244)]
    exact = _views_by_path(pipeline.batched_items(paths, resizes, workers=0, batch_size=3))
    calls = []

    def decoder(encoded):
        calls.append(len(encoded))
        return torchvision_decoder('cpu')(encoded)

    decoded = list(pipeline.batched_items(paths, resizes, workers=1, batch_size=3, gpu_jpegs=True,
                                          decoder=decoder))
    assert [i.path for b in decoded for i in b.items] == paths
    assert sum(calls) == 4  # baseline, grey, progressive, rotated: the others were decoded in the worker
    for path, (error, view) in _views_by_path(decoded).items():
        assert error == exact[path][0]
        if error is None:  # libjpeg-turbo in both, EXIF rotation applied to the decoded pixels
            assert view.shape == (3, 244, 244) and (view - exact[path][1]).abs().mean() < 2e-3, path


def test_a_jpeg_the_decoder_refuses_is_decoded_on_the_cpu_and_only_a_broken_file_fails(kinds):
    paths = [kinds['baseline.jpg'], kinds['rotated.jpg'], kinds['grey.jpg']]
    seen = []

    def refuses_the_rotated_one(encoded):
        seen.append(len(encoded))
        if any(len(e) == len(open(kinds['rotated.jpg'], 'rb').read()) for e in encoded):
            raise RuntimeError('nvjpeg: unsupported')
        return torchvision_decoder('cpu')(encoded)

    [batch] = pipeline.batched_items(paths, [SquareResize(244)], workers=0, batch_size=3, gpu_jpegs=True,
                                     decoder=refuses_the_rotated_one)
    assert seen == [3, 1, 1, 1]  # the batch, then each image alone
    assert [i.error for i in batch.items] == [None, None, None] and batch.pixels[0].shape == (3, 3, 244, 244)
    exact = _views_by_path(pipeline.batched_items([kinds['rotated.jpg']], [SquareResize(244)], 0, 1))
    assert torch.equal(batch.pixels[0][1], exact[kinds['rotated.jpg']][1])  # Pillow's pixels, exactly


def test_decode_gpu_without_cuda_is_a_clear_error(kinds, tiny_metric):
    with pytest.raises(InvalidArgument, match="decode 'gpu' needs a CUDA device; this run scores on cpu"):
        score(kinds['baseline.jpg'], 'grmp_iqa', device='cpu', decode='gpu')
    with pytest.raises(InvalidArgument, match="decode 'gpu' needs the metrics on one CUDA device; they run on cpu"):
        next(scoring.score_stream([kinds['baseline.jpg']], {'grmp_iqa': tiny_metric}, 1, decode='gpu'))


def test_encoded_bytes_are_bounded_and_an_unreadable_file_is_named(tmp_path, kinds):
    source = scoring.ImageFile(kinds['baseline.jpg'])
    size = len(open(kinds['baseline.jpg'], 'rb').read())
    assert len(source.read_bytes(size)) == size and source.read_bytes(size - 1) is None
    assert scoring.EncodedImage('k', b'abc').read_bytes(2) is None
    with pytest.raises(ImageReadError, match='gone.jpg'):
        scoring.ImageFile(str(tmp_path / 'gone.jpg')).read_bytes(100)


# ------------------------------------------------------------------------------------------------------ bf16
def test_cpu_bf16_support_is_read_from_the_cpu_flags_off_x86(tmp_path, monkeypatch):
    monkeypatch.setattr(precision.platform, 'machine', lambda: 'aarch64')
    info = tmp_path / 'cpuinfo'
    info.write_text('processor : 0\nFeatures : fp asimd sve bf16 i8mm\n')
    assert precision.cpu_has_bf16(str(info))
    info.write_text('processor : 0\nFeatures : fp asimd\n')
    assert not precision.cpu_has_bf16(str(info))


def test_fast_keeps_fp32_on_a_cpu_without_bf16_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: False)
    with pytest.warns(UserWarning, match='no bf16 matrix instructions'):
        assert _fast_settings(True, None, None, 'cpu') == ('fp32', 'auto')
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _fast_settings(True, None, None, 'cpu') == ('bf16', 'auto')
    assert _fast_settings(True, 'fp32', 'cpu', 'cpu') == ('fp32', 'cpu')  # explicit choices win


# ------------------------------------------------------------------------------------------------ on CUDA
def _cuda_metric(checkpoint):
    return pyiqa.create_metric('grmp_iqa', device='cuda', pretrained_model_path=checkpoint, backbone=TINY_BACKBONE,
                               num_visual_prompts=TINY_NUM_PROMPTS)


@pytest.mark.gpu
def test_gpu_decoded_scores_are_close_to_the_exact_ones_and_fallbacks_scored(kinds, tiny_checkpoint, monkeypatch):
    metrics = {'grmp_iqa': _cuda_metric(tiny_checkpoint)}
    paths = sorted(kinds.values())
    decoded = []
    nvjpeg = pipeline.torchvision_decoder

    def counting(device):
        decode = nvjpeg(device)
        return lambda encoded: (decoded.extend(encoded), decode(encoded))[1]

    monkeypatch.setattr(pipeline, 'torchvision_decoder', counting)
    exact = [r for c in scoring.score_stream(paths, metrics, 4, workers=2) for r in c]
    on_gpu = [r for c in scoring.score_stream(paths, metrics, 4, workers=2, decode='gpu') for r in c]
    assert len(decoded) == 4  # the four JPEGs nvJPEG takes; the rest went to the CPU
    assert [r.path for r in on_gpu] == paths
    assert [bool(r.errors) for r in on_gpu] == [bool(r.errors) for r in exact] == ['truncated' in p for p in paths]
    assert all(len(r.errors) == 1 for r in on_gpu if r.errors)  # reported once, by name
    for gpu, cpu in zip(on_gpu, exact):
        if not cpu.errors:
            assert abs(gpu.scores['grmp_iqa'] - cpu.scores['grmp_iqa']) < 1e-2, gpu.path


@pytest.mark.gpu
def test_nvjpeg_decodes_grey_progressive_and_rotated_jpegs_like_pillow(kinds):
    for name in ('baseline.jpg', 'grey.jpg', 'progressive.jpg', 'rotated.jpg'):
        data = open(kinds[name], 'rb').read()
        [image] = gpu_decode.decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)],
                                          torchvision_decoder('cuda'))
        image = orient(image, gpu_plan(data).orientation).cpu()
        expected = scoring.ImageFile(kinds[name]).decode()
        assert image.shape == expected.shape, name
        assert (image.float() - expected.float()).abs().mean() < 2.0, name  # nvJPEG's IDCT is not libjpeg's


@pytest.mark.gpu
def test_batches_land_on_the_gpu_as_one_tensor(kinds):
    paths = [kinds['baseline.jpg'], kinds['photo.png']]
    [batch] = pipeline.batched_items(paths, [SquareResize(244)], workers=1, batch_size=2, device=torch.device('cuda'))
    assert batch.pixels[0].device.type == 'cuda' and batch.pixels[0].shape == (2, 3, 244, 244)


def test_parts_collated_by_many_workers_join_into_full_batches_of_the_same_scores(kinds, tiny_metric):
    paths = sorted(kinds.values()) * 2
    metrics = {'grmp_iqa': tiny_metric}
    resizes = [scoring.declared_resize(tiny_metric)]
    parted = list(pipeline.batched_items(paths, resizes, workers=2, batch_size=8))  # parts of 5 from each worker
    assert [len(b.items) for b in parted] == [8, 8, 2] and [i.path for b in parted for i in b.items] == paths
    whole = list(pipeline.batched_items(paths, resizes, workers=0, batch_size=8))
    for joined, direct in zip(parted, whole):
        assert torch.equal(joined.pixels[0], direct.pixels[0])
        assert [i.views for i in joined.items] == [i.views for i in direct.items]
        scores = [r.scores for r in pipeline._score_chunk(joined, metrics, {'grmp_iqa': 0})]
        assert scores == [r.scores for r in pipeline._score_chunk(direct, metrics, {'grmp_iqa': 0})]


def test_bf16_on_a_cpu_without_bf16_instructions_warns_that_it_is_slower(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: False)
    with pytest.warns(UserWarning, match='runs emulated and slower than fp32'):
        options = precision.add_precision_option(['grmp_iqa'], {}, 'bf16', 'cpu')
    assert options == {'grmp_iqa': {'precision': 'bf16'}}
