"""pyiqa-grmp score / list, and reading awkward image files."""
import csv
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from grmp_test_utils import photo, tiny_grmp_cli_options
from pyiqa_grmp.cli import main
from pyiqa_grmp.options import parse_metric_options
from pyiqa_grmp.data.image_io import ImageReadError, decode_image, read_image


def _exif_rotated_jpeg(path):
    image = Image.fromarray(photo('astronaut')[:200, :100])  # 100 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif.tobytes())


@pytest.fixture(scope='module')
def awkward_folder(tmp_path_factory):
    """Every kind of file a user's folder may hold, two of them unreadable."""
    folder = tmp_path_factory.mktemp('awkward')
    rgb = photo('astronaut')
    Image.fromarray(rgb).save(folder / 'rgb.jpg')
    Image.fromarray(photo('camera')).save(folder / 'grey.png')
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / 'rgba.png')
    Image.fromarray(rgb).convert('P').save(folder / 'palette.png')
    Image.fromarray((photo('camera').astype(np.uint16) * 257)).save(folder / 'grey16.png')
    _exif_rotated_jpeg(folder / 'rotated.jpg')
    Image.fromarray(rgb[:8, :8]).save(folder / 'tiny.png')
    Image.fromarray(np.tile(rgb[:500, :500], (8, 12, 1))).save(folder / 'huge.jpg', quality=80)  # 6000 x 4000
    (folder / 'truncated.jpg').write_bytes((folder / 'rgb.jpg').read_bytes()[:2000])
    (folder / 'notes.png').write_text('not an image')
    return folder


def test_awkward_folder_is_scored_and_unreadable_files_are_reported(awkward_folder, tiny_checkpoint, tmp_path,
                                                                   capsys):
    out_csv = tmp_path / 'scores.csv'
    status = main(['score', 'grmp_iqa', '-t', str(awkward_folder), '--csv', str(out_csv), '--batch-size', '3',
                   *tiny_grmp_cli_options(tiny_checkpoint)])
    assert status == 1
    rows = {r['image'].rsplit('/', 1)[-1]: r for r in csv.DictReader(out_csv.open())}
    assert len(rows) == 10
    for name in ('truncated.jpg', 'notes.png'):
        assert rows[name]['grmp_iqa'] == '' and 'cannot read image' in rows[name]['errors']
    scored = [n for n in rows if n not in ('truncated.jpg', 'notes.png')]
    for name in scored:
        assert 0 < float(rows[name]['grmp_iqa']) < 1, name
        assert rows[name]['errors'] == ''
    err = capsys.readouterr().err
    assert 'truncated.jpg' in err and 'notes.png' in err


def test_batched_scores_equal_one_by_one(awkward_folder, tiny_checkpoint, tmp_path):
    scores = []
    for batch_size in ('1', '8'):
        out_csv = tmp_path / f'b{batch_size}.csv'
        main(['score', 'grmp_iqa', '-t', str(awkward_folder), '--csv', str(out_csv), '--batch-size', batch_size,
              *tiny_grmp_cli_options(tiny_checkpoint)])
        scores.append([float(r['grmp_iqa'] or 'nan') for r in csv.DictReader(out_csv.open())])
    assert np.allclose(scores[0], scores[1], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize('name, shape', [('rgb.jpg', (3, 512, 512)), ('grey.png', (3, 512, 512)),
                                         ('rgba.png', (3, 512, 512)), ('palette.png', (3, 512, 512)),
                                         ('rotated.jpg', (3, 100, 200)), ('tiny.png', (3, 8, 8))])
def test_read_image_gives_rgb_in_unit_range(awkward_folder, name, shape):
    image = read_image(str(awkward_folder / name))
    assert image.shape == shape and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1


def test_sixteen_bit_png_keeps_its_precision(tmp_path):
    values = np.arange(0, 65536, 7, dtype=np.uint16)[:4096].reshape(64, 64)
    Image.fromarray(values).save(tmp_path / 'g16.png')
    image = read_image(str(tmp_path / 'g16.png'))
    assert torch.allclose(image[0], torch.from_numpy(values.astype(np.float32) / 65535))


def test_eight_bit_image_decodes_to_uint8_and_reads_as_exactly_value_over_255(tmp_path):
    rgb = photo('coffee')[:40, :60]
    Image.fromarray(rgb).save(tmp_path / 'c.png')
    decoded = decode_image(str(tmp_path / 'c.png'))
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, torch.from_numpy(rgb).permute(2, 0, 1))
    expected = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(read_image(str(tmp_path / 'c.png')), expected)


def test_unreadable_file_error_names_it(awkward_folder):
    with pytest.raises(ImageReadError, match='truncated.jpg'):
        read_image(str(awkward_folder / 'truncated.jpg'))


def test_several_metrics_side_by_side_with_per_image_output(tmp_path, tiny_checkpoint, capsys):
    for name in ('astronaut', 'coffee'):
        Image.fromarray(photo(name)[:256, :256]).save(tmp_path / f'{name}.png')
    status = main(['score', 'grmp_iqa', 'piqe', 'entropy', '-t', str(tmp_path), '-v',
                   *tiny_grmp_cli_options(tiny_checkpoint)])
    out = capsys.readouterr().out
    assert status == 0
    assert 'astronaut.png' in out and 'coffee.png' in out
    for metric in ('grmp_iqa', 'piqe', 'entropy'):
        assert any(line.split()[:1] == [metric] and line.split()[3] == '0' for line in out.splitlines()), metric


def test_full_reference_metric_pairs_images_by_name(tmp_path, capsys):
    (tmp_path / 'dist').mkdir()
    (tmp_path / 'ref').mkdir()
    clean = photo('coffee')[:128, :128]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / 'dist' / 'a.png')
    Image.fromarray(clean).save(tmp_path / 'ref' / 'a.png')
    out_csv = tmp_path / 'fr.csv'
    assert main(['score', 'psnr', '-t', str(tmp_path / 'dist'), '-r', str(tmp_path / 'ref'),
                 '--csv', str(out_csv)]) == 0
    row = next(csv.DictReader(out_csv.open()))
    assert row['reference'].endswith('ref/a.png') and 15 < float(row['psnr']) < 35


def test_unavailable_metric_is_reported_and_the_others_still_run(tmp_path, capsys):
    Image.fromarray(photo('coffee')[:128, :128]).save(tmp_path / 'a.png')
    status = main(['score', 'entropy', 'niqe', '-t', str(tmp_path), '--metric-opt',
                   f'niqe:pretrained_model_path={tmp_path / "gone.mat"}'])
    captured = capsys.readouterr()
    assert status == 1
    assert 'FAILED [niqe]' in captured.err and 'cannot create metric' in captured.err
    assert any(line.split()[:1] == ['entropy'] for line in captured.out.splitlines())


def test_metric_options_are_parsed_as_yaml():
    options = parse_metric_options(['m:a=3', 'm:b=true', 'm:c=null', 'm:d=[1, 2]', 'm:e={x: 1}', 'm:f=path/x.pth'])
    assert options == {'m': {'a': 3, 'b': True, 'c': None, 'd': [1, 2], 'e': {'x': 1}, 'f': 'path/x.pth'}}
    with pytest.raises(ValueError, match='NAME:KEY=VALUE'):
        parse_metric_options(['broken'])


@pytest.mark.skipif(shutil.which('pyiqa-grmp') is None, reason='the pyiqa-grmp script is not installed')
def test_list_command_of_the_installed_script_includes_ours():
    result = subprocess.run([shutil.which('pyiqa-grmp'), 'list', '--mode', 'NR'], capture_output=True, text=True,
                            timeout=300)
    names = result.stdout.split()
    assert result.returncode == 0 and 'grmp_iqa' in names and 'piqe' in names and 'psnr' not in names


def test_missing_target_is_a_usage_error(tmp_path, capsys):
    assert main(['score', 'entropy', '-t', str(tmp_path / 'nothing_here')]) == 2
    assert 'nothing_here does not exist' in capsys.readouterr().err
