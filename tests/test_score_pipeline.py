"""Scoring collections: decoding workers, the declared fixed resize, image lists, the streamed CSV and --resume."""
import csv
import os

import numpy as np
import pytest
import pyiqa
import torch
from PIL import Image

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo, tiny_grmp_cli_options, tiny_model_kwargs
from pyiqa_grmp import scoring
from pyiqa_grmp.archs.grmp_arch import GRMPIQA, SquareResize
from pyiqa_grmp.cli import main
from pyiqa_grmp.data.image_io import read_image
from pyiqa_grmp.scoring import collect_targets, declared_resize, score_images, score_stream, write_csv
from pyiqa_grmp.scoring.pipeline import DecodedItem

SIZES = [(300, 200), (200, 300), (512, 512), (100, 400), (244, 244), (37, 53), (480, 360), (360, 480)]


@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory):
    """Eight photos of eight sizes (both orientations, smaller and larger than 244) and one broken file."""
    folder = tmp_path_factory.mktemp('mixed')
    rgb = photo('astronaut')
    for number, (height, width) in enumerate(SIZES):
        Image.fromarray(rgb[:height, :width]).save(folder / f'img{number}.png')
    (folder / 'img9_broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    return folder


@pytest.fixture(scope='module')
def tiny_metric(tiny_checkpoint):
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                               backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)


def _readable(folder):
    return [str(p) for p in sorted(folder.iterdir()) if 'broken' not in p.name]


def _metric_kwargs(checkpoint):
    return {'grmp_iqa': {'pretrained_model_path': checkpoint, 'backbone': TINY_BACKBONE,
                         'num_visual_prompts': TINY_NUM_PROMPTS}}


def _input_shapes(metric):
    shapes = []
    handle = metric.net.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_grmp_iqa_declares_its_squash_resize_only_in_float32():
    model = GRMPIQA(**tiny_model_kwargs())
    assert model.fixed_input_resize == SquareResize(244, antialias=False)
    assert model.half().fixed_input_resize is None


def test_worker_resize_scores_equal_scores_of_the_original_images(mixed_folder, tiny_metric):
    paths = _readable(mixed_folder)
    shapes, handle = _input_shapes(tiny_metric)
    try:
        results = [r for chunk in score_stream(paths, {'grmp_iqa': tiny_metric}, batch_size=4, workers=2)
                   for r in chunk]
    finally:
        handle.remove()
    assert all(shape[-2:] == (244, 244) for shape in shapes)  # the resize ran in the workers
    with torch.no_grad():
        originals = [tiny_metric(read_image(p).unsqueeze(0)).item() for p in paths]
    assert [r.path for r in results] == paths
    assert np.abs(np.array([r.scores['grmp_iqa'] for r in results]) - originals).max() <= 1e-6


def test_workers_pass_8_bit_images_as_uint8_when_the_main_process_finishes_them(mixed_folder):
    dataset = scoring.DecodedImages(_readable(mixed_folder), resizes=[SquareResize(244)], keep_native=False,
                                    finish_in_worker=False)
    item = dataset[0]
    assert item.native.dtype == torch.uint8 and item.views == []


def test_items_finished_in_the_main_process_equal_items_finished_in_workers(mixed_folder):
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    resizes = [SquareResize(244)]
    in_workers = list(scoring.prepared_items(paths, resizes, True, workers=2))
    in_main = list(scoring.prepared_items(paths, resizes, True, workers=2, finish_on=torch.device('cpu')))
    assert [i.path for i in in_main] == [i.path for i in in_workers] == paths
    for here, there in zip(in_main, in_workers):
        assert here.error == there.error
        if here.error is None:
            assert here.native.dtype == torch.float32 and torch.equal(here.native, there.native)
            assert torch.equal(here.views[0], there.views[0])
    assert sum(i.error is not None for i in in_main) == 1


def test_a_resize_that_fails_is_reported_as_the_view_not_raised():
    item = DecodedItem(0, 'x.png', native=torch.zeros(3, 4, 4, dtype=torch.uint8))

    def broken_resize(images):
        raise RuntimeError('out of memory')

    scoring.finish_item(item, [broken_resize], keep_native=False)
    assert item.views == ['RuntimeError: out of memory'] and item.native is None


def test_images_of_mixed_sizes_arrive_in_full_batches(mixed_folder, tiny_metric):
    shapes, handle = _input_shapes(tiny_metric)
    try:
        for _ in score_stream(_readable(mixed_folder), {'grmp_iqa': tiny_metric}, batch_size=4, workers=1):
            pass
    finally:
        handle.remove()
    assert shapes == [(4, 3, 244, 244), (4, 3, 244, 244)]


def test_native_resolution_metric_is_batched_by_equal_size(tmp_path):
    rgb = photo('coffee')
    for name, (height, width) in zip('abcde', [(64, 96), (80, 80), (64, 96), (80, 80), (50, 70)]):
        Image.fromarray(rgb[:height, :width]).save(tmp_path / f'{name}.png')
    metric = pyiqa.create_metric('entropy', device='cpu')
    assert declared_resize(metric) is None
    shapes, handle = _input_shapes(metric)
    try:
        results = [r for chunk in score_stream(sorted(str(p) for p in tmp_path.iterdir()), {'entropy': metric},
                                               batch_size=8, workers=1) for r in chunk]
    finally:
        handle.remove()
    assert shapes == [(2, 3, 64, 96), (2, 3, 80, 80), (1, 3, 50, 70)]
    assert all('entropy' in r.scores for r in results)


def test_unreadable_image_is_reported_by_name_while_the_others_are_scored(mixed_folder, tiny_metric):
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    results = [r for chunk in score_stream(paths, {'grmp_iqa': tiny_metric}, batch_size=4, workers=2)
               for r in chunk]
    broken = [r for r in results if 'broken' in r.path]
    assert len(broken) == 1 and broken[0].scores == {}
    assert broken[0].errors[0].kind == 'image' and 'img9_broken.jpg' in broken[0].errors[0].reason
    assert all('grmp_iqa' in r.scores and not r.errors for r in results if 'broken' not in r.path)


def test_image_list_paths_are_relative_to_its_folder_or_absolute(tmp_path, mixed_folder):
    (tmp_path / 'lists').mkdir()
    listed = tmp_path / 'lists' / 'photos.txt'
    absolute = str(mixed_folder / 'img3.png')
    os.symlink(mixed_folder, tmp_path / 'photos')
    listed.write_text(f'../photos/img1.png\n\n{absolute}\n../photos/img0.png\n')
    images = collect_targets(str(listed))
    assert images == [os.path.join(str(tmp_path / 'lists'), '../photos/img1.png'), absolute,
                      os.path.join(str(tmp_path / 'lists'), '../photos/img0.png')]
    assert all(os.path.isfile(image) for image in images)


def test_image_list_naming_an_image_twice_is_refused(tmp_path):
    listed = tmp_path / 'list.txt'
    listed.write_text('a.png\nb.png\na.png\n')
    with pytest.raises(ValueError, match=r'names .*a\.png twice \(lines 1 and 3\)'):
        collect_targets(str(listed))


def test_cli_scores_the_images_of_a_list_and_names_the_missing_one(tmp_path, mixed_folder, tiny_checkpoint):
    listed = tmp_path / 'list.txt'
    listed.write_text(f'{mixed_folder / "img2.png"}\n{mixed_folder / "img0.png"}\n{tmp_path / "gone.png"}\n')
    out_csv = tmp_path / 'scores.csv'
    assert main(['score', 'grmp_iqa', '-t', str(listed), '--csv', str(out_csv), '--workers', '1',
                 *tiny_grmp_cli_options(tiny_checkpoint)]) == 1
    rows = list(csv.DictReader(out_csv.open()))
    assert [os.path.basename(r['image']) for r in rows] == ['img2.png', 'img0.png', 'gone.png']
    assert rows[0]['grmp_iqa'] and rows[1]['grmp_iqa']
    assert rows[2]['grmp_iqa'] == '' and 'gone.png' in rows[2]['errors']


def test_rows_reach_the_csv_while_the_run_goes_on(mixed_folder, tiny_checkpoint, tmp_path, monkeypatch):
    out_csv = tmp_path / 'scores.csv'
    lines_seen = []
    score_chunk = scoring.pipeline._score_chunk

    def spying(*args):
        lines_seen.append(len(out_csv.read_text().splitlines()))
        return score_chunk(*args)

    monkeypatch.setattr(scoring.pipeline, '_score_chunk', spying)
    score_images(['grmp_iqa'], str(mixed_folder), batch_size=3, progress=False, workers=1,
                 metric_options=_metric_kwargs(tiny_checkpoint), csv_path=str(out_csv))
    assert lines_seen == [1, 4, 7]  # the header, then three more rows before each next batch is scored


def test_final_csv_is_in_path_order_and_in_the_format_of_write_csv(mixed_folder, tiny_checkpoint, tmp_path):
    streamed = tmp_path / 'streamed.csv'
    options = {**_metric_kwargs(tiny_checkpoint), 'niqe': {'pretrained_model_path': str(tmp_path / 'gone.mat')}}
    report = score_images(['grmp_iqa', 'niqe'], str(mixed_folder), batch_size=3, progress=False,
                          workers=2, metric_options=options, csv_path=str(streamed))
    written = tmp_path / 'written.csv'
    write_csv(report, str(written))
    assert streamed.read_bytes() == written.read_bytes()
    rows = list(csv.reader(streamed.open()))
    assert [r[0] for r in rows[1:]] == sorted(str(p) for p in mixed_folder.iterdir())
    assert all(r[-1].split(' | ')[0] == f'niqe: {scoring.results.NOT_CREATED}' for r in rows[1:])  # reason: once
    assert [f.reason[:22] for f in report.errors if f.kind == 'metric'] == ['cannot create metric: ']


def test_resume_keeps_the_rows_and_scores_only_the_missing_images(mixed_folder, tiny_checkpoint, tmp_path,
                                                                  tiny_metric):
    full = tmp_path / 'full.csv'
    score_images(['grmp_iqa'], str(mixed_folder), batch_size=1, progress=False, workers=0,
                 metric_options=_metric_kwargs(tiny_checkpoint), csv_path=str(full))
    lines = full.read_bytes().split(b'\r\n')
    kept = lines[:4]  # header and three rows, the second of them marked so that re-scoring would show
    kept[2] = kept[2].replace(kept[2].split(b',')[2], b'0.5')
    resumed = tmp_path / 'resumed.csv'
    resumed.write_bytes(b'\r\n'.join(kept) + b'\r\n' + lines[4][:20])  # a run killed while writing a row
    counted = []
    original = scoring.pipeline._score_group
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring.pipeline, '_score_group', lambda name, metric, items, *rest: (
            counted.extend(i.path for i in items), original(name, metric, items, *rest))[1])
        score_images(['grmp_iqa'], str(mixed_folder), batch_size=1, progress=False, workers=0,
                     metric_options=_metric_kwargs(tiny_checkpoint), csv_path=str(resumed), resume=True)
    assert counted == [line.split(b',')[0].decode() for line in lines[4:-1] if b'broken' not in line]
    expected = lines[:]
    expected[2] = kept[2]
    assert resumed.read_bytes() == b'\r\n'.join(expected)


def test_resume_refuses_a_csv_written_for_other_metrics(mixed_folder, tmp_path, capsys):
    out_csv = tmp_path / 'scores.csv'
    out_csv.write_text('image,reference,piqe,errors\r\n')
    assert main(['score', 'entropy', '-t', str(mixed_folder), '--csv', str(out_csv), '--resume']) == 2
    assert "written for the metrics ['piqe'], not ['entropy']" in capsys.readouterr().err
    assert out_csv.read_bytes() == b'image,reference,piqe,errors\r\n'


def test_resume_refuses_a_csv_written_for_another_target(mixed_folder, tmp_path, capsys):
    out_csv = tmp_path / 'scores.csv'
    out_csv.write_text('image,reference,entropy,errors\r\n/elsewhere/x.png,,3.5,\r\n')
    assert main(['score', 'entropy', '-t', str(mixed_folder), '--csv', str(out_csv), '--resume']) == 2
    assert 'written for another target' in capsys.readouterr().err


def test_resume_without_csv_is_a_usage_error(mixed_folder, capsys):
    with pytest.raises(SystemExit) as stop:
        main(['score', 'entropy', '-t', str(mixed_folder), '--resume'])
    assert stop.value.code == 2 and '--resume needs --csv' in capsys.readouterr().err


def test_encoded_images_score_as_their_files_and_a_broken_one_is_reported_by_key(mixed_folder, tiny_metric):
    paths = _readable(mixed_folder)[:3]
    encoded = [scoring.EncodedImage(f'shard.tar:{i}', open(p, 'rb').read()) for i, p in enumerate(paths)]
    encoded.append(scoring.EncodedImage('shard.tar:broken', b'\xff\xd8 not really a jpeg'))
    metrics = {'grmp_iqa': tiny_metric}
    from_files = [r for chunk in score_stream(paths, metrics, batch_size=4) for r in chunk]
    from_bytes = [r for chunk in score_stream(encoded, metrics, batch_size=4, workers=1) for r in chunk]
    assert [r.path for r in from_bytes] == [e.key for e in encoded]
    assert [r.scores for r in from_bytes[:3]] == [r.scores for r in from_files]
    assert from_bytes[3].scores == {} and 'shard.tar:broken' in from_bytes[3].errors[0].reason
