"""Training under torchrun on the CPU (2 gloo ranks) through the real command: the contracts are equality with one
process (fine-tuning: 2 ranks x batch b == 1 process x batch 2b; meta-training: parallel Reptile == one process;
the protocol: the same tables), identical weights on every rank, files written by rank 0 alone, and clear errors
for launches that cannot work."""
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from grmp_test_utils import (finish_command, free_port, grmp_command, run_logged, run_main, start_command,
                             torchrun_command)
from pyiqa_grmp.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'
FINETUNE = CONFIGS / 'finetune_synthetic.yml'
META = CONFIGS / 'meta_pretrain_synthetic.yml'
#: Augmentation and prompt dropout off (they draw per rank); SGD (Adam's normalised step would turn float noise of
#: near-zero gradients into differences of lr); the official rule at lambda 5; 3 steps of 32 shots.
FINETUNE_CONTRACT = ['network:augment=false', 'network:prompt_dropout=0', 'train:grad_reg:mode=official',
                     'train:grad_reg:lam=5', 'train:optim:type=SGD', 'train:optim:lr=0.05', 'train:total_epoch=1',
                     'val:val_freq=2', 'logger:print_freq=1', 'logger:save_checkpoint_freq=1']
#: Five distortion types as tasks (pristine held out): an odd count, so one rank is idle once per round.
META_CONTRACT = ['network:backbone_pretrained=~', 'train:total_epoch=2', 'val:val_freq=3', 'logger:print_freq=1',
                 'datasets:train:sources=[{name: synthetic, meta_info_file: datasets/synthetic/meta_info_synthetic.csv,'
                 ' dataroot_target: datasets/synthetic, type_column: distortion, exclude_types: [pristine]}]']
TIMEOUT = 400
#: The end-of-run check: every synchronised tensor compared bit for bit across the ranks.
RANKS_AGREE = re.compile(r'weights identical on all 2 ranks \([1-9]\d* tensors compared by sha256\)')


def _command(ranks, command, config, name, overrides, *extra):
    args = [command, '-opt', str(config), *(['--launcher', 'pytorch'] if ranks else []), *extra, '--force_yml',
            *overrides, f'name={name}']
    return torchrun_command(ranks, *args) if ranks else grmp_command(*args)


def _start(workdir, ranks, config, name, overrides, *extra, command='train'):
    return start_command(_command(ranks, command, config, name, overrides, *extra), workdir)


def _outcome(process):
    """(exit status, output) of a launch once it has ended; the whole job is killed if it outlives TIMEOUT."""
    return finish_command(process, TIMEOUT)


def _run(workdir, ranks, config, name, overrides, *extra, command='train'):
    return _outcome(_start(workdir, ranks, config, name, overrides, *extra, command=command))


def _side_by_side(workdir, config, one, two, command='train'):
    """The same run on 2 ranks (launched, in the background) and meanwhile in one process (this one,
    single-threaded as each rank); ``one`` and ``two`` are (name, overrides, extra arguments). Returns (status,
    output) of each: the log of the one process, the launch's stdout and stderr."""
    on_two_ranks = _start(workdir, 2, config, two[0], two[1], *two[2], command=command)
    try:
        in_one_process = run_logged(_command(0, command, config, one[0], one[1], *one[2])[3:], workdir)
    except BaseException:
        os.killpg(on_two_ranks.pid, signal.SIGKILL)
        on_two_ranks.communicate()
        raise
    return in_one_process, _outcome(on_two_ranks)


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['params']


def _max_difference(a_path, b_path):
    a, b = _weights(a_path), _weights(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope='module')
def finetune_runs(synthetic_workdir):
    """One process with batch 32 and two ranks with batch 16 each, otherwise the same run."""
    one, two = _side_by_side(synthetic_workdir, FINETUNE,
                             ('dist_one', [*FINETUNE_CONTRACT, 'datasets:train:batch_size_per_gpu=32'], ()),
                             ('dist_two', [*FINETUNE_CONTRACT, 'datasets:train:batch_size_per_gpu=16'], ()))
    assert one[0] == 0, one[1][-3000:]
    assert two[0] == 0, two[1][-3000:]
    experiments = synthetic_workdir / 'experiments'
    return {'one': experiments / 'dist_one', 'two': experiments / 'dist_two', 'log_two': two[1]}


def test_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(finetune_runs):
    for name in ('net_1.pth', 'net_3.pth', 'net_latest.pth'):
        difference = _max_difference(finetune_runs['one'] / 'models' / name, finetune_runs['two'] / 'models' / name)
        assert difference < 1e-5, f'{name}: weights differ by {difference}'


def test_ranks_end_with_identical_weights(finetune_runs):
    assert RANKS_AGREE.search(finetune_runs['log_two'])


def test_only_rank_0_writes_and_the_files_are_those_of_one_process(finetune_runs):
    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file() and not p.name.endswith('.log'))

    assert files(finetune_runs['two']) == files(finetune_runs['one'])
    assert len(list(finetune_runs['two'].glob('*.log'))) == 1


def test_parallel_reptile_ends_with_the_theta_of_one_process(synthetic_workdir):
    one, two = _side_by_side(synthetic_workdir, META, ('meta_dist_one', META_CONTRACT, ()),
                             ('meta_dist_two', META_CONTRACT, ()))
    assert one[0] == 0, one[1][-3000:]
    assert two[0] == 0, two[1][-3000:]
    assert '2 epochs, 10 iterations' in one[1]  # 5 tasks a round
    assert '2 epochs, 6 iterations' in two[1]  # 3 turns a round on each rank, one of them idle
    experiments = synthetic_workdir / 'experiments'
    difference = _max_difference(experiments / 'meta_dist_one' / 'models' / 'net_latest.pth',
                                 experiments / 'meta_dist_two' / 'models' / 'net_latest.pth')
    assert difference < 1e-5, f'theta differs by {difference}'
    assert RANKS_AGREE.search(two[1])


def test_protocol_spreads_runs_over_ranks_and_writes_the_tables_of_one_process(synthetic_workdir):
    budget = ['train:total_epoch=2', 'val:val_freq=1', 'logger:print_freq=1']
    one, two = _side_by_side(synthetic_workdir, FINETUNE,
                             ('protocol_one', budget, ('--runs', '2', '--out', 'protocol_one')),
                             ('protocol_two', budget, ('--runs', '2', '--out', 'protocol_two')), command='protocol')
    assert one[0] == 0, one[1][-3000:]
    assert two[0] == 0, two[1][-3000:]
    table_one = pd.read_csv(synthetic_workdir / 'protocol_one' / 'protocol.csv').drop(columns='checkpoint')
    table_two = pd.read_csv(synthetic_workdir / 'protocol_two' / 'protocol.csv').drop(columns='checkpoint')
    pd.testing.assert_frame_equal(table_one, table_two)


def test_fewer_shots_than_ranks_is_a_clear_error_before_the_ranks_meet(synthetic_workdir, monkeypatch):
    """What every rank of ``torchrun --nproc_per_node 2`` does first; no rank waits for the others to fail."""
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))

    def rendezvous(*args, **kwargs):
        raise AssertionError('the ranks met before the refusal')

    monkeypatch.setattr('pyiqa_grmp.training.init_distributed', rendezvous)
    status, _, err = run_main(['train', '-opt', str(FINETUNE), '--launcher', 'pytorch', '--force_yml',
                               'datasets:train:num_shots=1', 'name=too_few'], synthetic_workdir)
    assert status == 2
    assert '1 training images (num_shots x dataset_enlarge_ratio) cannot be shared by 2 processes' in err
    assert not (synthetic_workdir / 'experiments' / 'too_few').exists()


def test_launcher_without_torchrun_environment_fails_at_once(synthetic_workdir, capsys, monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(name, raising=False)
    cwd = os.getcwd()
    os.chdir(synthetic_workdir)
    try:
        assert main(['train', '-opt', str(FINETUNE), '--launcher', 'pytorch', '--force_yml', 'name=no_env']) == 2
    finally:
        os.chdir(cwd)
    assert "launcher 'torchrun' was asked for, but RANK and WORLD_SIZE are not set" in capsys.readouterr().err
    assert not (synthetic_workdir / 'experiments' / 'no_env').exists()


def test_two_ranks_stopped_by_sigterm_resume_to_the_uninterrupted_run(finetune_runs, synthetic_workdir):
    experiment = synthetic_workdir / 'experiments' / 'dist_sigterm'
    overrides = [*FINETUNE_CONTRACT, 'datasets:train:batch_size_per_gpu=16']
    process = _start(synthetic_workdir, 2, FINETUNE, 'dist_sigterm', overrides)
    deadline = time.monotonic() + TIMEOUT
    while not (experiment / 'training_states' / '1.state').exists():
        assert process.poll() is None and time.monotonic() < deadline, 'training ended before it could be stopped'
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert 'training stopped by SIGTERM after iteration' in output, output[-3000:]
    status, output = _run(synthetic_workdir, 2, FINETUNE, 'dist_sigterm', overrides, '--auto_resume')
    assert status == 0, output[-3000:]
    assert 'resuming from' in output
    for name in ('net_latest.pth', 'net_best.pth'):
        assert _max_difference(finetune_runs['two'] / 'models' / name, experiment / 'models' / name) == 0
