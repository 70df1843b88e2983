"""pyiqa_grmp.distributed, and scoring under torchrun: two gloo ranks write the CSV of one process."""
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from grmp_test_utils import (REPO_ROOT, free_port, grmp_command, photo, subprocess_env, tiny_grmp_cli_options,
                             torchrun_command)
from pyiqa_grmp import distributed
from pyiqa_grmp.cli import main

SUBPROCESS_TIMEOUT = 300
NUM_IMAGES = 40


def test_shard_is_disjoint_complete_and_balanced():
    items = list(range(11))
    shares = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == items
    assert [len(share) for share in shares] == [4, 4, 3]
    assert shares == [distributed.shard(items, rank, 3) for rank in range(3)]
    with pytest.raises(ValueError, match='rank 3 is not in a world of size 3'):
        distributed.shard(items, 3, 3)


def test_launch_environment_reads_torchrun_and_slurm_variables():
    torchrun = {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1'}
    slurm = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '2'}
    assert distributed.launch_environment(None, torchrun) == distributed.LaunchEnvironment('torchrun', 3, 4, 1)
    assert distributed.launch_environment(None, slurm) == distributed.LaunchEnvironment('slurm', 5, 8, 2)
    assert distributed.launch_environment('slurm', {**torchrun, **slurm}).launcher == 'slurm'
    assert distributed.launch_environment(None, {}) is None
    assert distributed.launch_environment(None, {'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) is None


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(name, raising=False)
    context = distributed.init_distributed(None, device='cpu')
    assert context == distributed.DistContext(0, 1, 0, torch.device('cpu'), None)
    assert distributed.broadcast_object('x') == 'x' and distributed.all_gather_objects(1) == [1]
    assert distributed.gather_objects(2) == [2] and distributed.is_main_process()


def test_launcher_without_its_variables_is_a_clear_error(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(ValueError, match="launcher 'torchrun' was asked for, but RANK and WORLD_SIZE are not set"):
        distributed.init_distributed('torchrun', device='cpu')


def test_nccl_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(ValueError, match='the nccl backend needs CUDA devices'):
        distributed.init_distributed('torchrun', device='cpu', backend='nccl')


def test_local_rank_beyond_the_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '3')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(ValueError, match='LOCAL_RANK 3 has no GPU: this machine has 2 CUDA device'):
        distributed.init_distributed(None, device='cuda')


def _collectives_in_one_rank(rank, port, results):
    """One rank of a two-process job, forked from the test (so nothing is imported again)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS='1')
    context = distributed.init_distributed('torchrun', device='cpu')
    try:
        distributed.barrier()
        same = {'a': torch.arange(6.0), 'mask': torch.full((2, 2), float('-inf'))}
        drifted = {**same, 'b': torch.tensor([1.0, 2.0 + rank * 1e-6])}
        try:
            distributed.check_ranks_hold_the_same(drifted)
            drift_error = None
        except RuntimeError as error:
            drift_error = str(error)
        results[rank] = (context, distributed.broadcast_object(f'from {rank}'),
                         distributed.all_gather_objects({'rank': rank}), distributed.gather_objects(rank * 10),
                         distributed.is_main_process(), distributed.get_rank(), distributed.get_world_size(),
                         distributed.check_ranks_hold_the_same(same), drift_error)
    finally:
        distributed.destroy()


def _two_ranks(rank_fn, *args) -> dict:
    """What each of two forked processes ``rank_fn(rank, port, *args, results)`` put into ``results[rank]``,
    killed (and the test failed) when they do not finish in time."""
    with mp.Manager() as manager:
        results = manager.dict()
        job = mp.start_processes(rank_fn, args=(free_port(), *args, results), nprocs=2, join=False,
                                 start_method='fork')
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not job.join(timeout=1):
            if time.monotonic() > deadline:
                for process in job.processes:
                    process.kill()
                pytest.fail('the two ranks did not finish in time')
        return dict(results)


def test_collectives_across_two_gloo_processes():
    results = _two_ranks(_collectives_in_one_rank)
    for rank in (0, 1):
        context, broadcast, gathered, gathered_on_zero, main, own_rank, world_size, compared, drift = results[rank]
        assert context == distributed.DistContext(rank, 2, rank, torch.device('cpu'), 'gloo')
        assert broadcast == 'from 0' and gathered == [{'rank': 0}, {'rank': 1}] and main == (rank == 0)
        assert gathered_on_zero == ([0, 10] if rank == 0 else None)
        assert (own_rank, world_size) == (rank, 2)
        assert compared == 2
        assert drift == ('the ranks ended training with different weights: 1 of 3 tensors differ from rank 0: '
                         'b on rank(s) 1')


def _job_end_in_one_rank(rank, port, folder, alone, results):
    """One rank of a two-process job that warns and then leaves as ``pyiqa-grmp score`` does (stderr captured):
    joined inside the block and failing on rank 0 (``--csv``), or ``alone`` under torchrun until the end and
    failing on rank 1 (``--out``)."""
    import contextlib
    import io
    import sys
    import warnings

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS='1', TORCHELASTIC_RUN_ID='test',
                      TORCHELASTIC_ERROR_FILE=os.path.join(folder, f'error{rank}.json'))
    err = io.StringIO()
    warnings.simplefilter('default')
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        warnings.formatwarning(message, category, filename, lineno), end='', file=sys.stderr)
    with contextlib.redirect_stderr(err):
        with distributed.warnings_once():
            if not alone:
                distributed.init_distributed('torchrun', device='cpu')  # joined inside the block, as score does
            warnings.warn('every rank says this')
            if rank == 1:
                warnings.warn('only rank 1 says this')
        failing = 1 if alone else 0
        status = distributed.leave_with_status(1 if rank == failing else 0, f'3 failure(s) on rank {rank}')
        seen_by_rank_zero = dict(results) if rank == 0 else None
    distributed.destroy()
    if rank == 1:
        time.sleep(0.5)  # rank 0 must still wait for this process to end
    results[rank] = (status, err.getvalue(), seen_by_rank_zero)


def _job_end(folder, alone):
    """(exit status, stderr, what rank 0 saw of the other ranks when it left) per rank of a two-rank gloo job."""
    return _two_ranks(_job_end_in_one_rank, folder, alone)


@pytest.fixture(scope='module', params=['joined', 'alone'])
def job_end(request, tmp_path_factory):
    """What each rank of a job that joined (``--csv``) or worked alone (``--out``) gave, and its error files."""
    folder = str(tmp_path_factory.mktemp(f'job_end_{request.param}'))
    return _job_end(folder, request.param == 'alone'), folder, request.param


def test_rank_zero_shows_each_warning_of_the_ranks_once(job_end):
    results, _, _ = job_end
    zero, one = results[0][1], results[1][1]
    assert one == ''
    assert zero.count('UserWarning: every rank says this') == 1
    assert zero.count('only rank 1 says this') == 1 and 'UserWarning (rank 1): only rank 1 says this' in zero


def test_only_rank_zero_exits_with_the_status_of_the_job_and_tells_torchrun_why(job_end):
    import json

    results, folder, kind = job_end
    assert (results[0][0], results[1][0]) == (1, 0)
    assert 1 in results[0][2], 'rank 0 left before the other rank had ended'
    with open(os.path.join(folder, 'error0.json')) as handle:  # the format torchrun's ChildFailedError shows
        message = json.load(handle)['message']['message']
    assert message == ('3 failure(s) on rank 1' if kind == 'alone' else '3 failure(s) on rank 0')
    assert not os.path.exists(os.path.join(folder, 'error1.json'))


def test_digests_tell_bit_identical_tensors_from_any_difference():
    base = {'w': torch.tensor([1.0, 2.0, 3.0]), 'mask': torch.tensor([0.0, float('-inf')]), 'n': torch.tensor(3)}
    digests = distributed.tensor_digests(base)
    assert distributed.tensor_digests({k: v.clone() for k, v in base.items()}) == digests
    swapped = {**base, 'w': torch.tensor([2.0, 1.0, 3.0])}  # the same sum: a checksum of sums cannot see this
    one_ulp = {**base, 'w': torch.nextafter(base['w'], torch.tensor(9.0))}
    retyped = {**base, 'w': base['w'].double()}
    reshaped = {**base, 'w': base['w'].reshape(3, 1)}
    for other in (swapped, one_ulp, retyped, reshaped):
        assert distributed.tensor_digests(other)['w'] != digests['w']
        assert distributed.tensor_digests(other)['mask'] == digests['mask']


def test_differing_tensors_names_each_tensor_and_the_ranks_it_differs_on():
    same = {'a': '1', 'b': '2', 'c': '3'}
    assert distributed.differing_tensors([same, dict(same), dict(same)]) == {}
    gathered = [same, {**same, 'b': 'x'}, {**same, 'b': 'y', 'c': 'z'}, {'a': '1', 'b': '2'}]
    assert distributed.differing_tensors(gathered) == {'b': [1, 2], 'c': [2, 3]}
    assert distributed.differing_tensors([same, {**same, 'extra': '4'}]) == {'extra': [0, 1]}


# ---------------------------------------------------------------------------------------- scoring under torchrun
@pytest.fixture(scope='module')
def collection(tmp_path_factory):
    """Forty JPEG photos of three sizes and one file that is not an image."""
    folder = tmp_path_factory.mktemp('collection')
    rgb = photo('astronaut')
    for number in range(NUM_IMAGES):
        height, width = [(384, 512), (512, 384), (300, 400)][number % 3]
        image = Image.fromarray(rgb).resize((width, height), Image.BICUBIC).rotate(number * 9)
        image.save(folder / f'photo{number:02d}.jpg', quality=90)
    (folder / 'photo99.jpg').write_text('not an image')
    return folder


def _score_args(collection, out_csv, checkpoint, *extra):
    # Batch 1 everywhere: the ranks and one process then run the very same batches, so scores are equal bit
    # for bit (batches of other compositions differ by float rounding, see test_cli's batched test).
    return ['score', 'grmp_iqa', '-t', str(collection), '--csv', str(out_csv), '--batch-size', '1',
            '--device', 'cpu', *tiny_grmp_cli_options(checkpoint), *extra]


@pytest.fixture(scope='module')
def one_process_csv(collection, tiny_checkpoint, tmp_path_factory):
    """The CSV of a single uninterrupted process (one thread, like the subprocesses)."""
    out_csv = tmp_path_factory.mktemp('one') / 'scores.csv'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_score_args(collection, out_csv, tiny_checkpoint, '--workers', '0')) == 1  # photo99 fails
    finally:
        torch.set_num_threads(threads)
    return out_csv.read_bytes()


def _torchrun(args, timeout=SUBPROCESS_TIMEOUT):
    return subprocess.run(torchrun_command(2, *args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=REPO_ROOT)


def test_two_ranks_write_the_csv_of_one_process_and_report_its_failure_once(collection, tiny_checkpoint,
                                                                           one_process_csv, tmp_path):
    out_csv = tmp_path / 'scores.csv'
    result = _torchrun(_score_args(collection, out_csv, tiny_checkpoint, '--workers', '1'))
    assert 'photo99.jpg' in result.stderr, result.stderr[-3000:]
    assert out_csv.read_bytes() == one_process_csv
    assert result.stderr.count('FAILED [*]') == 1 and result.stdout.count('grmp_iqa ') == 1
    assert result.stderr.count('1 failure(s); see the messages above') == 1
    assert not list(tmp_path.glob('scores.csv.part*'))
    # what the README documents: rank 0 alone exits 1, so torchrun's report (its own traceback and one block)
    # names rank 0 only, with the reason as its traceback line; torchrun exits 1
    assert result.returncode == 1
    assert result.stderr.count('Traceback (most recent call last)') == 1
    assert result.stderr.count('exitcode  : ') == 1 and 'rank      : 0 (local_rank: 0)' in result.stderr
    assert (f'traceback : pyiqa-grmp score: 1 failure(s) (images or metrics that could not be scored; the others '
            f'were): see the errors column of {out_csv}') in result.stderr
    assert 'SIGTERM' not in result.stderr


def test_two_ranks_resume_from_the_csv_and_part_files_of_an_earlier_run(collection, tiny_checkpoint,
                                                                        one_process_csv, tmp_path):
    lines = one_process_csv.split(b'\r\n')
    header, rows = lines[0], lines[1:-1]
    out_csv = tmp_path / 'scores.csv'
    out_csv.write_bytes(b'\r\n'.join([header, *rows[0:20:2]]) + b'\r\n' + rows[20][:15])
    (tmp_path / 'scores.csv.part1').write_bytes(b'\r\n'.join([header, *rows[1:20:2]]) + b'\r\n')
    (tmp_path / 'scores.csv.part2').write_bytes(b'\r\n'.join([header, rows[25]]) + b'\r\n')
    result = _torchrun(_score_args(collection, out_csv, tiny_checkpoint, '--workers', '1', '--resume'))
    assert out_csv.read_bytes() == one_process_csv, result.stderr[-3000:]
    assert not list(tmp_path.glob('scores.csv.part*'))


def test_resume_after_a_killed_run_gives_the_csv_of_an_uninterrupted_run(collection, tiny_checkpoint,
                                                                         one_process_csv, tmp_path):
    out_csv = tmp_path / 'scores.csv'
    command = grmp_command(*_score_args(collection, out_csv, tiny_checkpoint, '--workers', '1'))
    run = subprocess.Popen(command, env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while not (out_csv.exists() and out_csv.read_bytes().count(b'\n') >= 3) and run.poll() is None:
            assert time.monotonic() < deadline, 'the run wrote no rows in time'
            time.sleep(0.002)
        still_running = run.poll() is None
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=SUBPROCESS_TIMEOUT)
    rows_at_kill = out_csv.read_bytes().count(b'\n') - 1
    assert still_running and rows_at_kill < NUM_IMAGES + 1, 'the run finished before it could be killed'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_score_args(collection, out_csv, tiny_checkpoint, '--workers', '1', '--resume')) == 1
    finally:
        torch.set_num_threads(threads)
    assert out_csv.read_bytes() == one_process_csv
