"""Scoring shards: webdataset and parquet in, a parquet file per shard out, shard-per-task runs, reruns, merge."""
import inspect
import io
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyiqa
import pytest
import torch
from PIL import Image

import pyiqa_grmp
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo, run_main
from pyiqa_grmp import distributed, scoring
from pyiqa_grmp.scoring import score_images, score_to_shards
from pyiqa_grmp.scoring.results import NOT_CREATED
from pyiqa_grmp.scoring.shard_output import read_output_metadata
from pyiqa_grmp.scoring.shards import expand_braces, expand_targets, tar_entries

SIZES = [(60, 80), (90, 50), (64, 64), (50, 120), (77, 33)]


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Five small PNGs of five sizes in a folder, and their bytes by key."""
    folder = tmp_path_factory.mktemp('folder')
    rgb = photo('astronaut')
    encoded = {}
    for number, (height, width) in enumerate(SIZES):
        path = folder / f'{number:03d}.png'
        Image.fromarray(rgb[number * 7:number * 7 + height, :width]).save(path)
        encoded[f'{number:03d}'] = path.read_bytes()
    return folder, encoded


@pytest.fixture(scope='module')
def tiny_metric(tiny_checkpoint):
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                               backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)


@pytest.fixture(scope='module')
def folder_scores(images, tiny_metric):
    """The scores of the folder's images, by file name stem (the reference every input format must give)."""
    report = score_images(['grmp_iqa'], str(images[0]), progress=False, metrics={'grmp_iqa': tiny_metric})
    return {os.path.basename(path)[:-4]: scores['grmp_iqa'] for path, scores in report.scores.items()}


def write_tar(path, members):
    """A tar of (name, bytes) members, as webdataset writers make them."""
    with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def shards_run(metric, targets, out, **options):
    options.setdefault('shard_size', 10_000)
    return score_to_shards(['grmp_iqa'], [str(t) for t in targets], str(out), progress=False,
                           metrics={'grmp_iqa': metric}, **options)


def test_webdataset_shards_score_as_the_same_images_from_a_folder(images, tiny_metric, folder_scores, tmp_path):
    _, encoded = images
    keys = sorted(encoded)
    write_tar(tmp_path / '00000.tar', [m for k in keys[:3] for m in ((f'{k}.png', encoded[k]),
                                                                      (f'{k}.json', b'{"caption": "x"}'))])
    # a sample with two image members: each is scored as KEY.EXT
    write_tar(tmp_path / '00001.tar', [(f'{keys[3]}.png', encoded[keys[3]]), (f'{keys[3]}.seg.png', encoded[keys[4]])])
    run = shards_run(tiny_metric, [tmp_path / '{00000..00001}.tar'], tmp_path / 'out', workers=2)
    assert [entry[:4] for entry in run.shards] == [('00000', 'scored', 3, 0), ('00001', 'scored', 2, 0)]
    merged = pyiqa_grmp.merge(tmp_path / 'out')
    assert list(merged['key']) == [*keys[:3], f'{keys[3]}.png', f'{keys[3]}.seg.png']
    expected = [folder_scores[k] for k in keys]
    assert np.allclose(merged['grmp_iqa'], expected, rtol=0, atol=1e-6)
    assert list(zip(merged['height'], merged['width'])) == SIZES and (merged['error'] == '').all()


def test_parquet_shards_score_as_the_folder_with_keys_and_kept_columns(images, tiny_metric, folder_scores,
                                                                       tmp_path):
    _, encoded = images
    keys = sorted(encoded)
    plain = pa.table({'key': keys, 'jpg': [encoded[k] for k in keys], 'caption': [f'c{k}' for k in keys]})
    pq.write_table(plain, tmp_path / 'plain.parquet', row_group_size=2)  # three row groups
    hugging_face = pa.table({'picture': [{'bytes': encoded[k], 'path': f'{k}.png'} for k in keys]})
    pq.write_table(hugging_face, tmp_path / 'hf.parquet')
    shards_run(tiny_metric, [tmp_path / 'plain.parquet'], tmp_path / 'out', keep_columns=['caption'], workers=2)
    shards_run(tiny_metric, [tmp_path / 'hf.parquet'], tmp_path / 'out_hf')
    plain_rows = pyiqa_grmp.merge(tmp_path / 'out')
    assert list(plain_rows['key']) == keys and list(plain_rows['caption']) == [f'c{k}' for k in keys]
    struct_rows = pyiqa_grmp.merge(tmp_path / 'out_hf')
    assert list(struct_rows['key']) == ['0', '1', '2', '3', '4']  # no key column: the row index
    for rows in (plain_rows, struct_rows):
        assert np.allclose(rows['grmp_iqa'], [folder_scores[k] for k in keys], rtol=0, atol=1e-6)
        assert list(zip(rows['height'], rows['width'])) == SIZES


def test_a_member_that_does_not_decode_is_a_failed_row_and_the_shard_goes_on(images, tiny_metric, tmp_path):
    _, encoded = images
    write_tar(tmp_path / 'a.tar', [('000.png', encoded['000']), ('bad.jpg', b'\xff\xd8 not a jpeg'),
                                   ('002.png', encoded['002'])])
    run = shards_run(tiny_metric, [tmp_path / 'a.tar'], tmp_path / 'out')
    rows = pyiqa_grmp.merge(tmp_path / 'out').set_index('key')
    assert rows.loc['000', 'grmp_iqa'] > 0 and rows.loc['002', 'grmp_iqa'] > 0
    assert np.isnan(rows.loc['bad', 'grmp_iqa']) and 'a.tar:bad.jpg' in rows.loc['bad', 'error']
    assert pd.isna(rows.loc['bad', 'width'])
    assert [(f.image, f.metric) for f in run.errors] == [('bad', None)]


def test_gpu_decoding_takes_the_jpeg_members_of_tars_and_parquet_cells_and_records_their_sizes(images, tiny_metric,
                                                                                               tmp_path,
                                                                                               monkeypatch):
    from pyiqa_grmp.scoring import pipeline
    from pyiqa_grmp.scoring.gpu_decode import torchvision_decoder

    rgb = photo('rocket')
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the recorded size is the oriented one
    members = []
    for number, (height, width) in enumerate(SIZES):
        buffer = io.BytesIO()
        Image.fromarray(rgb[:height, number * 9:number * 9 + width]).save(
            buffer, 'JPEG', quality=90, **({'exif': exif} if number == 0 else {}))
        members.append((f'{number:03d}.jpg', buffer.getvalue()))
    members.append(('005.png', images[1]['001']))  # not a JPEG: decoded in the worker
    write_tar(tmp_path / 'a.tar', members)
    pq.write_table(pa.table({'jpg': [data for _, data in members]}), tmp_path / 'b.parquet', row_group_size=4)
    # (width, height): the rotated first one stands up; the PNG is the folder's second image
    sizes = [SIZES[0], *[(w, h) for h, w in SIZES[1:]], (SIZES[1][1], SIZES[1][0])]
    exact = {name: pyiqa_grmp.merge(shards_run(tiny_metric, [tmp_path / name], tmp_path / f'cpu_{name}').out_dir)
             for name in ('a.tar', 'b.parquet')}
    decoded = []

    def cpu_nvjpeg(device):  # torchvision's CPU decoder in nvJPEG's place: the GPU path, run on this machine
        decode = torchvision_decoder('cpu')
        return lambda encoded: (decoded.append(len(encoded)), decode(encoded))[1]

    monkeypatch.setattr(pipeline, 'decode_mode', lambda *args: 'gpu')
    monkeypatch.setattr(pipeline, 'torchvision_decoder', cpu_nvjpeg)
    for name in ('a.tar', 'b.parquet'):
        decoded.clear()
        rows = pyiqa_grmp.merge(shards_run(tiny_metric, [tmp_path / name], tmp_path / f'gpu_{name}', workers=2,
                                           decode='gpu').out_dir)
        assert sum(decoded) == len(SIZES), name  # every JPEG went to the decoder, the PNG did not
        assert list(zip(rows['width'], rows['height'])) == sizes and (rows['error'] == '').all(), name
        assert np.allclose(rows['grmp_iqa'], exact[name]['grmp_iqa'], rtol=0, atol=1e-3), name
        assert list(zip(exact[name]['width'], exact[name]['height'])) == sizes, name


def test_a_truncated_tar_is_reported_by_name_and_its_readable_samples_kept(images, tiny_metric, tmp_path):
    _, encoded = images
    write_tar(tmp_path / 'whole.tar', [(f'{k}.png', encoded[k]) for k in ('000', '001', '002')])
    data = (tmp_path / 'whole.tar').read_bytes()
    cut = tmp_path / 'cut.tar'
    cut.write_bytes(data[:tar_entries(str(tmp_path / 'whole.tar'))[0][2][1] + 100])  # inside the third member
    run = shards_run(tiny_metric, [cut], tmp_path / 'out')
    rows = pyiqa_grmp.merge(tmp_path / 'out')
    assert list(rows['key']) == ['000', '001'] and rows['grmp_iqa'].notna().all()
    assert len(run.errors) == 1 and run.errors[0].image == str(cut) and 'is damaged' in run.errors[0].reason
    assert 'cut.tar is damaged' in read_output_metadata(str(tmp_path / 'out' / 'cut.parquet'))['shard']['failures'][0]


def test_tar_links_folders_and_huge_extended_headers_are_not_followed(images, tmp_path):
    _, encoded = images
    with tarfile.open(tmp_path / 'odd.tar', 'w', format=tarfile.PAX_FORMAT) as archive:
        for name, kind in (('dir', tarfile.DIRTYPE), ('link.png', tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, '/etc/passwd'
            archive.addfile(info)
        info = tarfile.TarInfo('000.png')
        info.size = len(encoded['000'])
        archive.addfile(info, io.BytesIO(encoded['000']))
    assert [name for name, _, _ in tar_entries(str(tmp_path / 'odd.tar'))[0]] == ['000.png']
    header = tarfile.TarInfo('././@PaxHeader')
    header.type, header.size = tarfile.XHDTYPE, 2 << 20  # pax records of 2 MiB: not read into memory
    (tmp_path / 'hostile.tar').write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + b'\0' * (3 << 20))
    entries, damage = tar_entries(str(tmp_path / 'hostile.tar'))
    assert entries == [] and 'extended header at byte 0 announces 2097152 bytes' in damage


def test_a_parquet_without_an_image_column_is_refused_naming_the_file_and_its_columns(tiny_metric, tmp_path):
    pq.write_table(pa.table({'key': ['a'], 'url': ['http://x']}), tmp_path / 'meta.parquet')
    with pytest.raises(ValueError, match=r'meta\.parquet has no image column.*its columns are key, url'):
        shards_run(tiny_metric, [tmp_path / 'meta.parquet'], tmp_path / 'out')
    assert not (tmp_path / 'out' / 'meta.parquet').exists()


def test_two_shard_index_runs_together_equal_one_run(images, tiny_metric, tmp_path):
    folder, _ = images
    for index in (1, 0):
        run = shards_run(tiny_metric, [folder], tmp_path / 'split', shard_size=2, num_shards=2, shard_index=index)
        assert [entry[0] for entry in run.shards] == (['part-00001'] if index else ['part-00000', 'part-00002'])
    shards_run(tiny_metric, [folder], tmp_path / 'whole', shard_size=2)
    split, whole = pyiqa_grmp.merge(tmp_path / 'split'), pyiqa_grmp.merge(tmp_path / 'whole')
    assert list(whole['key']) == sorted(str(p) for p in folder.iterdir())
    pd.testing.assert_frame_equal(split, whole)


def test_a_partial_shard_is_redone_and_a_completed_one_skipped(images, tiny_metric, tmp_path, monkeypatch):
    folder, _ = images
    out = tmp_path / 'out'
    shards_run(tiny_metric, [folder], out, shard_size=3)
    done = out / 'part-00000.parquet'
    stamp = done.stat().st_mtime_ns
    os.remove(out / 'part-00001.parquet')  # as a run killed while writing it leaves it: a temporary file only
    (out / '.part-00001.parquet.0123456789abcdef.tmp').write_bytes(b'PAR1 half a file')
    scored = []
    original = scoring.run.score_stream
    monkeypatch.setattr(scoring.run, 'score_stream', lambda sources, *rest, **options: (
        scored.extend(s.key for s in sources), original(sources, *rest, **options))[1])
    run = shards_run(tiny_metric, [folder], out, shard_size=3)
    assert [entry[:2] for entry in run.shards] == [('part-00000', 'skipped'), ('part-00001', 'scored')]
    assert scored == sorted(str(p) for p in folder.iterdir())[3:]
    assert done.stat().st_mtime_ns == stamp and sorted(os.listdir(out)) == [
        '_shards.json', 'part-00000.parquet', 'part-00001.parquet']
    assert len(pyiqa_grmp.merge(out)) == len(SIZES)


def test_a_rerun_with_other_metrics_or_weights_is_refused_naming_the_difference(images, tiny_metric, tmp_path):
    folder, _ = images
    out = tmp_path / 'out'
    shards_run(tiny_metric, [folder], out, shard_size=3, shard_index=0, num_shards=2)
    with pytest.raises(ValueError, match=r'part-00000\.parquet was scored with other settings: metrics: '
                                         r'\["grmp_iqa"\] there, \["entropy"\] now'):
        score_to_shards(['entropy'], [str(folder)], str(out), shard_size=3, progress=False, num_shards=2)
    other = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained=False, backbone_pretrained=None,
                                backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    with pytest.raises(ValueError, match=r'weights\.grmp_iqa: "[0-9a-f]{64}" there, "[0-9a-f]{64}" now'):
        shards_run(other, [folder], out, shard_size=3, shard_index=1, num_shards=2)
    assert sorted(os.listdir(out)) == ['_shards.json', 'part-00000.parquet']  # refused before scoring


def test_merge_refuses_incomplete_shards_by_name_unless_allowed(images, tiny_metric, tmp_path):
    folder, _ = images
    out = tmp_path / 'out'
    shards_run(tiny_metric, [folder], out, shard_size=2, num_shards=3, shard_index=1)
    with pytest.raises(ValueError, match=r'2 shard\(s\) not complete: part-00000, part-00002'):
        pyiqa_grmp.merge(out)
    partial = pyiqa_grmp.merge(out, allow_partial=True)
    assert list(partial['shard']) == ['part-00001'] * 2 and partial.attrs['missing'] == ['part-00000', 'part-00002']


def test_a_metric_that_cannot_be_created_gives_its_reason_once_and_rows_a_short_one(images, tmp_path):
    folder, _ = images
    frame = pyiqa_grmp.score(folder, ['entropy', 'niqe'], out=tmp_path / 'out', shard_size=10, workers=0,
                             progress=False, metric_options={'niqe': {'pretrained_model_path': str(tmp_path / 'x')}})
    assert [(f.metric, f.image) for f in frame.attrs['errors']] == [('niqe', None)]
    assert frame.attrs['errors'][0].reason.startswith('cannot create metric: ')
    rows = pyiqa_grmp.merge(tmp_path / 'out')
    assert (rows['error'] == f'niqe: {NOT_CREATED}').all() and rows['entropy'].notna().all()
    assert 'cannot create metric' in read_output_metadata(str(tmp_path / 'out' / 'part-00000.parquet'))[
        'failures'][0]['reason']


def test_score_flags_map_to_the_arguments_of_score(tmp_path, monkeypatch):
    seen = {}
    signature = inspect.signature(pyiqa_grmp.api._score_shards)

    def fake_shards(*args):
        seen.update(signature.bind(*args).arguments)
        frame = pd.DataFrame({'shard': ['a'], 'status': ['scored'], 'images': [1], 'failed': [0], 'path': ['p']})
        frame.attrs['errors'] = []
        return frame

    monkeypatch.setattr(pyiqa_grmp.api, '_score_shards', fake_shards)
    status, out, _ = run_main(['score', 'grmp_iqa', '-t', 'a.tar', 'b.parquet', '--out', str(tmp_path),
                               '--num-shards', '4', '--shard-index', '3', '--shard-size', '7', '--image-column',
                               'img', '--key-column', 'id', '--keep-columns', 'url', 'caption'])
    assert status == 0 and 'a: scored (1 images)' in out
    assert {k: seen[k] for k in ('targets', 'out', 'num_shards', 'shard_index', 'shard_size', 'image_column',
                                 'key_column', 'keep_columns')} == {
        'targets': ['a.tar', 'b.parquet'], 'out': str(tmp_path), 'num_shards': 4, 'shard_index': 3, 'shard_size': 7,
        'image_column': 'img', 'key_column': 'id', 'keep_columns': ['url', 'caption']}


def test_merge_command_writes_the_rows_in_shard_then_key_order_to_csv(images, tmp_path):
    _, encoded = images
    write_tar(tmp_path / 'b.tar', [('002.png', encoded['002']), ('001.png', encoded['001'])])
    write_tar(tmp_path / 'a.tar', [('000.png', encoded['000'])])
    pyiqa_grmp.score([tmp_path / 'b.tar', tmp_path / 'a.tar'], 'entropy', out=tmp_path / 'out', workers=0,
                     progress=False, num_shards=1, shard_index=0)
    status, out, _ = run_main(['merge', str(tmp_path / 'out'), '--csv', str(tmp_path / 'all.csv')])
    table = pd.read_csv(tmp_path / 'all.csv', dtype={'key': str})
    assert status == 0 and 'entropy' in out
    assert list(zip(table['shard'], table['key'])) == [('b', '001'), ('b', '002'), ('a', '000')]


def test_brace_ranges_and_globs_expand_in_order(tmp_path):
    assert expand_braces('s/{008..011}.tar') == ['s/008.tar', 's/009.tar', 's/010.tar', 's/011.tar']
    assert expand_braces('{a,b}/{1..2}') == ['a/1', 'a/2', 'b/1', 'b/2'] and expand_braces('x{y}') == ['x{y}']
    for name in ('b.tar', 'a.tar', 'c.parquet'):
        (tmp_path / name).write_bytes(b'')
    assert expand_targets([str(tmp_path / '*.tar'), str(tmp_path / 'c.parquet')]) == [
        str(tmp_path / 'a.tar'), str(tmp_path / 'b.tar'), str(tmp_path / 'c.parquet')]
    with pytest.raises(FileNotFoundError, match='matches no file'):
        expand_targets([str(tmp_path / '*.webp')])


def test_task_slot_comes_from_a_slurm_array_split_over_its_ranks():
    assert distributed.task_slot({}) == (1, 0)
    assert distributed.task_slot({'RANK': '2', 'WORLD_SIZE': '4', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '8'}) == (4, 2)
    assert distributed.task_slot({'SLURM_ARRAY_TASK_ID': '5', 'SLURM_ARRAY_TASK_MIN': '1',
                                  'SLURM_ARRAY_TASK_COUNT': '10'}) == (10, 4)
    assert distributed.task_slot({'SLURM_ARRAY_TASK_ID': '3', 'SLURM_ARRAY_TASK_COUNT': '10', 'RANK': '1',
                                  'WORLD_SIZE': '8'}) == (80, 25)


def test_under_torchrun_each_rank_scores_its_shards_alone(images, tmp_path, monkeypatch):
    folder, _ = images
    for rank in (1, 0):  # the launcher's variables, as torchrun sets them for each rank
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('WORLD_SIZE', '2')
        monkeypatch.setenv('LOCAL_RANK', str(rank))
        frame = pyiqa_grmp.score(folder, 'entropy', out=tmp_path / 'out', shard_size=2, workers=0, progress=False,
                                 device='cpu')
        assert list(frame['shard']) == (['part-00001'] if rank else ['part-00000', 'part-00002'])
        assert not torch.distributed.is_initialized()  # no process group: no rank waits for another
    assert len(pyiqa_grmp.merge(tmp_path / 'out')) == len(SIZES)


def test_merge_refuses_shards_of_two_runs_with_other_settings(images, tiny_metric, tmp_path):
    folder, _ = images
    shards_run(tiny_metric, [folder], tmp_path / 'a', shard_size=3, num_shards=2, shard_index=0)
    shards_run(tiny_metric, [folder], tmp_path / 'b', shard_size=3, num_shards=2, shard_index=1, precision='bf16')
    os.replace(tmp_path / 'b' / 'part-00001.parquet', tmp_path / 'a' / 'part-00001.parquet')  # as two tasks at once
    with pytest.raises(ValueError, match=r'mixes runs: part-00000 and part-00001 differ: precision: null in '
                                         r'part-00000, "bf16" in part-00001'):
        pyiqa_grmp.merge(tmp_path / 'a')
