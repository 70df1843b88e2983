"""Files and paths: non-regular files, file names that are not UTF-8, symlinked outputs, permissions, damaged CSVs."""
import csv
import os
import re
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pyiqa_grmp import scoring
from pyiqa_grmp.checkpointing import atomic_torch_save, atomic_write, remove_stale_temporaries
from pyiqa_grmp.cli import main
from pyiqa_grmp.comparison import compare
from pyiqa_grmp.data.image_io import ImageReadError, NotARegularFileError, decode_image, open_regular_file
from pyiqa_grmp.checkpointing import write_atomically
from pyiqa_grmp.reporting import copy_atomically
from pyiqa_grmp.scoring import Failure, decode_path, encode_path, score_images

CAFE = os.fsdecode(b'caf\xe9.png')  # a Latin-1 name: not UTF-8
HEADER = b'image,reference,entropy,errors\r\n'


def _tiny_png(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def _command(*args):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONIOENCODING='utf-8:strict')
    return subprocess.run([sys.executable, '-m', 'pyiqa_grmp', 'score', 'entropy', *args], capture_output=True,
                          text=True, errors='backslashreplace', env=env, timeout=120)


@contextmanager
def _umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope='module')
def awkward_run(tmp_path_factory):
    """A folder with a FIFO named like an image and a file name that is not UTF-8, scored by the real command."""
    folder = tmp_path_factory.mktemp('awkward')
    _tiny_png(folder / 'a.png')
    _tiny_png(os.path.join(os.fsencode(folder), b'caf\xe9.png'), seed=1)
    os.mkfifo(folder / 'x.jpg')
    out_csv = folder.parent / f'{folder.name}.csv'
    return folder, out_csv, _command('-t', str(folder), '--csv', str(out_csv), '--workers', '1', '-v')


def test_fifo_in_a_folder_is_reported_as_a_failed_row_and_the_run_ends(awkward_run):
    folder, out_csv, result = awkward_run
    assert result.returncode == 1, result.stderr
    rows = list(csv.reader(out_csv.open(newline='', encoding='utf-8')))
    assert rows[-1] == [str(folder / 'x.jpg'), '', '',
                        f'cannot read image {folder / "x.jpg"}: not a regular file but a FIFO']
    assert f'FAILED [*] {folder / "x.jpg"}: cannot read image' in result.stderr
    assert rows[1][0] == str(folder / 'a.png') and float(rows[1][2]) > 0


def test_non_utf8_name_is_scored_written_escaped_and_matched_by_resume(awkward_run):
    folder, out_csv, result = awkward_run
    written = out_csv.read_bytes()
    escaped = f'fsbytes:{folder}/caf\\xe9.png'
    row = next(r for r in csv.reader(written.decode('utf-8').splitlines()) if r[0] == escaped)
    assert float(row[2]) > 0 and row[3] == ''
    assert f'{folder}/caf\\xe9.png  entropy=' in result.stdout  # printed, escaped, with a strict stdout
    # keep only the header and that row, with a score that shows whether it was scored again
    marked = f'{escaped},,0.5,\r\n'.encode()
    out_csv.write_bytes(HEADER + marked)
    resumed = _command('-t', str(folder), '--csv', str(out_csv), '--resume', '--workers', '0')
    assert resumed.returncode == 1, resumed.stderr  # the FIFO is reported again
    assert out_csv.read_bytes() == written.replace(f'{escaped},,{row[2]},\r\n'.encode(), marked)


def test_path_encoding_keeps_utf8_names_and_round_trips_without_collisions():
    names = ['/photos/plain.png', '/photos/été 100%.png', 'rel/caf\\xe9.png', CAFE, 'fsbytes:x.png',
             os.fsdecode(b'fsbytes:\xff'), 'two\nlines.png', 'back\\slash\r.png', os.fsdecode(b'\xed\xa0\x80')]
    texts = [encode_path(name) for name in names]
    assert texts[:3] == names[:3]  # valid UTF-8 names are written as they are, escape-like text included
    assert texts[3] == 'fsbytes:caf\\xe9.png' and texts[4] == 'fsbytes:fsbytes:x.png'
    assert texts[6] == 'fsbytes:two\\x0alines.png' and texts[7] == 'fsbytes:back\\\\slash\\x0d.png'
    assert len(set(texts)) == len(names) and [decode_path(text) for text in texts] == names
    assert all(text.encode('utf-8').decode('utf-8') == text and '\n' not in text for text in texts)
    with pytest.raises(ValueError, match='backslash'):
        decode_path('fsbytes:bad\\q.png')


def test_links_to_regular_files_are_scored_and_links_to_fifos_devices_and_lists_reported(tmp_path):
    _tiny_png(tmp_path / 'real.png')
    os.mkfifo(tmp_path / 'pipe')
    (tmp_path / 'folder').mkdir()
    os.symlink(tmp_path / 'real.png', tmp_path / 'folder' / 'link.png')
    os.symlink(tmp_path / 'pipe', tmp_path / 'folder' / 'pipe.png')
    report = score_images(['entropy'], str(tmp_path / 'folder'), progress=False, workers=0)
    assert list(report.scores) == [str(tmp_path / 'folder' / 'link.png')]
    assert report.errors == [Failure(None, str(tmp_path / 'folder' / 'pipe.png'),
                                     f'cannot read image {tmp_path / "folder" / "pipe.png"}: not a regular file but a '
                                     'FIFO')]
    listed = tmp_path / 'list.txt'
    listed.write_bytes(b'real.png\npipe\n/dev/zero\ncaf\xe9.png\n')
    _tiny_png(os.path.join(os.fsencode(tmp_path), b'caf\xe9.png'))
    report = score_images(['entropy'], str(listed), progress=False, workers=0)
    assert sorted(report.scores) == sorted([str(tmp_path / 'real.png'), str(tmp_path / CAFE)])
    assert [failure.reason.split(': ')[-1] for failure in report.errors] == [
        'not a regular file but a FIFO', 'not a regular file but a character device']


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    _tiny_png(tmp_path / 'real.png')
    os.mkfifo(tmp_path / 'pipe.png')
    real_stat = os.stat
    monkeypatch.setattr(os, 'stat', lambda path, *args, **kwargs: real_stat(tmp_path / 'real.png'))
    with pytest.raises(NotARegularFileError, match='pipe.png is not a regular file but a FIFO'):
        open_regular_file(str(tmp_path / 'pipe.png'))


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


@pytest.mark.parametrize('pillow_limit', ['default', None])
def test_decompression_bomb_is_a_read_error_even_with_pillows_limit_off(tmp_path, monkeypatch, pillow_limit):
    if pillow_limit is None:
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)
    bomb = tmp_path / 'bomb.png'
    bomb.write_bytes(_png_header(30000, 30000))  # 900 megapixels in 70 bytes
    with pytest.raises(ImageReadError, match=r'bomb\.png: DecompressionBombError: .*900000000 pixels'):
        decode_image(str(bomb))


@pytest.fixture
def two_images(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    _tiny_png(folder / 'a.png')
    _tiny_png(folder / 'b.png', seed=1)
    return folder


def test_symlinked_csv_is_replaced_and_its_target_left_unchanged(two_images, tmp_path):
    target = tmp_path / 'precious.txt'
    target.write_bytes(b'not to be touched\n')
    link = tmp_path / 'scores.csv'
    os.symlink(target, link)
    assert main(['score', 'entropy', '-t', str(two_images), '--csv', str(link), '--workers', '0']) == 0
    assert target.read_bytes() == b'not to be touched\n'
    assert not link.is_symlink() and len(link.read_text().splitlines()) == 3


def test_resume_through_a_symlinked_csv_keeps_its_rows_and_leaves_its_target_unchanged(two_images, tmp_path):
    earlier = tmp_path / 'earlier.csv'
    row = f'{two_images / "a.png"},,0.5,\r\n'.encode()
    earlier.write_bytes(HEADER + row)
    link = tmp_path / 'scores.csv'
    os.symlink(earlier, link)
    assert main(['score', 'entropy', '-t', str(two_images), '--csv', str(link), '--resume', '--workers', '0']) == 0
    assert earlier.read_bytes() == HEADER + row
    assert not link.is_symlink() and link.read_bytes().startswith(HEADER + row)
    assert len(link.read_bytes().splitlines()) == 3


def test_atomic_writers_replace_a_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / 'target'
    target.write_bytes(b'kept')
    for number, write in enumerate([lambda path: atomic_write(path, lambda handle: handle.write(b'new')),
                                    lambda path: write_atomically(path, 'new'),
                                    lambda path: copy_atomically(str(target), path)]):
        link = tmp_path / f'link{number}'
        os.symlink(target, link)
        write(str(link))
        assert not link.is_symlink() and link.read_bytes() in (b'new', b'kept')
        assert target.read_bytes() == b'kept'


def _meta(tmp_path):
    (tmp_path / 'labelled').mkdir()
    for number in range(4):
        _tiny_png(tmp_path / 'labelled' / f'{number}.png', seed=number)
    meta = tmp_path / 'meta.csv'
    pd.DataFrame({'image': [f'{n}.png' for n in range(4)], 'mos': [1.0, 2.0, 3.0, 4.0]}).to_csv(meta, index=False)
    return str(meta), str(tmp_path / 'labelled')


def test_compare_outputs_are_written_atomically_over_symlinks(tmp_path):
    meta, root = _meta(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    target = tmp_path / 'precious.md'
    target.write_text('not to be touched')
    os.symlink(target, out / 'results.md')
    compare(['entropy'], meta_info=meta, root=root, device='cpu', out_dir=str(out), progress=False)
    assert target.read_text() == 'not to be touched'
    assert not (out / 'results.md').is_symlink() and 'entropy' in (out / 'results.md').read_text()
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o077, 0o600)], ids=['umask022', 'umask077'])
def test_written_files_get_the_mode_of_an_ordinary_open_under_the_umask(two_images, tmp_path, mask, mode):
    meta, root = _meta(tmp_path)
    with _umask(mask):
        atomic_torch_save({'params': {}}, str(tmp_path / 'model.pth'))
        write_atomically(str(tmp_path / 'report.md'), 'text')
        copy_atomically(str(tmp_path / 'model.pth'), str(tmp_path / 'copy.pth'))
        assert main(['score', 'entropy', '-t', str(two_images), '--csv', str(tmp_path / 'scores.csv'),
                     '--workers', '0']) == 0
        compare(['entropy'], meta_info=meta, root=root, device='cpu', out_dir=str(tmp_path / 'out'), progress=False)
    written = ['model.pth', 'report.md', 'copy.pth', 'scores.csv'] + [f'out/{name}' for name in os.listdir(
        tmp_path / 'out')]
    assert {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in written} == {
        name: oct(mode) for name in written}


def test_stale_temporaries_are_removed_and_a_folder_named_like_one_is_kept(tmp_path):
    (tmp_path / '.model.pth.0123456789abcdef.tmp').write_bytes(b'half')
    (tmp_path / '.folder.tmp').mkdir()
    assert remove_stale_temporaries(str(tmp_path)) == ['.model.pth.0123456789abcdef.tmp']
    assert os.listdir(tmp_path) == ['.folder.tmp']


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / 'shared.md'
    path.write_text('old')
    os.chmod(path, 0o640)
    with _umask(0o077):
        write_atomically(str(path), 'new')
    assert path.read_text() == 'new' and os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.parametrize('body, message', [
    (b'%s,,7.1,\r\n%s,,' + b'x' * 2000 + b',\r\n', r'line 3: field larger than field limit \(1000\)'),
    (b'%s,,seven,\r\n', r"line 2: the entropy score 'seven' is not a number"),
    (b'%s,,7.1,\r\n%s,,7.\x002,\r\n', 'line 3 holds a NUL byte'),
    (b'%s,,7.1,caf\xe9\r\n', 'line 2 is not UTF-8 text'),
    (b'fsbytes:%s\\q,,7.1,\r\n', r'line 2: the path .* has a backslash'),
    (b'%s,,7.1,\r\n"%s,,7.2,\r\n', 'line 3: unexpected end of data'),
], ids=['oversized_field', 'non_numeric_score', 'nul_byte', 'not_utf8', 'bad_path_escape', 'unclosed_quote'])
def test_damaged_resume_csv_is_a_clear_error_naming_the_file_and_line_before_scoring(two_images, tmp_path,
                                                                                    monkeypatch, capsys, body,
                                                                                    message):
    names = (os.fsencode(two_images / 'a.png'), os.fsencode(two_images / 'b.png'))
    out_csv = tmp_path / 'scores.csv'
    out_csv.write_bytes(HEADER + body % names[:body.count(b'%s')])
    before = out_csv.read_bytes()
    monkeypatch.setattr(scoring.results, 'MAX_CSV_FIELD', 1000)
    monkeypatch.setattr(scoring.run, 'score_stream', lambda *args, **kwargs: pytest.fail('scoring started'))
    assert main(['score', 'entropy', '-t', str(two_images), '--csv', str(out_csv), '--resume']) == 2
    err = capsys.readouterr().err
    assert f'pyiqa-grmp score: error: --csv {out_csv} line' in err and 'Traceback' not in err
    assert re.search(message, err), err
    assert out_csv.read_bytes() == before
