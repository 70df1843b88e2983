"""Crash-safe training: runs killed by SIGKILL or stopped by SIGTERM (launched commands, each a process of its own),
then resumed with --auto_resume through the command (in this process), end with exactly the weights of an
uninterrupted run; cut-short states are skipped; a resume under a
changed config fails; runs without validation finish."""
import functools
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from grmp_test_utils import grmp_command, run_logged, start_command
from pyiqa_grmp.checkpointing import (ResumeError, atomic_torch_save, check_resume_fingerprint, find_resume_state,
                                      resume_fingerprint)
from pyiqa_grmp.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'
FINETUNE = CONFIGS / 'finetune_synthetic.yml'
META = CONFIGS / 'meta_pretrain_synthetic.yml'
#: 96 shots in batches of 32: 3 iterations per epoch, 12 in all; a state at every iteration; validation every 2;
#: augmentation (random crops and flips) and prompt dropout on, as in the config.
FINETUNE_RUN = ['train:total_epoch=4', 'datasets:train:batch_size_per_gpu=32', 'val:val_freq=2',
                'logger:save_checkpoint_freq=1', 'logger:print_freq=1']
#: Meta-training on the base-less tiny backbone (random weights): 4 tasks per round, 3 rounds.
META_RUN = ['network:backbone_pretrained=~', 'train:total_epoch=3', 'val:val_freq=3', 'logger:save_checkpoint_freq=1',
            'logger:print_freq=1']
TIMEOUT = 300


def _command(config, name, overrides, *extra):
    return grmp_command('train', '-opt', str(config), *extra, '--force_yml', *overrides, f'name={name}')


def _start(workdir, config, name, overrides, *extra):
    return start_command(_command(config, name, overrides, *extra), workdir)


def _resume_here(workdir, config, name, overrides):
    """``pyiqa-grmp train ... --auto_resume`` to its end, in this process (the interruptions need processes of their
    own, the resume does not): (status, what it logged)."""
    return run_logged(_command(config, name, overrides, '--auto_resume')[3:], workdir)


def _wait_for(predicate, process, limit=TIMEOUT):
    deadline = time.monotonic() + limit
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f'training ended (status {process.returncode}) before the moment to stop it:\n'
                                 + process.stdout.read()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError('timed out waiting for the moment to stop training')
        time.sleep(0.002)


def _states(experiment):
    folder = experiment / 'training_states'
    return sorted(int(p.stem) for p in folder.glob('*.state')) if folder.is_dir() else []


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['params']


def _base_digest(path):
    return torch.load(path, map_location='cpu', weights_only=True)['applies_to']['digest']


def _assert_same_weights(reference, experiment, files=('net_latest.pth', 'net_best.pth')):
    """The compact checkpoints hold the same tensors and apply to the same base (its digest)."""
    for name in files:
        expected, got = _weights(reference / 'models' / name), _weights(experiment / 'models' / name)
        assert _base_digest(reference / 'models' / name) == _base_digest(experiment / 'models' / name)
        assert expected.keys() == got.keys()
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f'{name}: {len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}'


def _finished(process, experiment):
    """The folder of ``experiment`` once ``process``, its run, has ended well."""
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-3000:]
    return experiment


@pytest.fixture(scope='module')
def reference_run(synthetic_workdir):
    """The uninterrupted fine-tuning run that every interrupted one must reproduce bit for bit: a function that
    waits for it. It runs in the background meanwhile, on the core the single-threaded run under test leaves."""
    process = _start(synthetic_workdir, FINETUNE, 'resume_reference', FINETUNE_RUN)
    yield functools.cache(lambda: _finished(process, synthetic_workdir / 'experiments' / 'resume_reference'))
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_sigterm_writes_a_state_exits_nonzero_and_auto_resume_matches_the_uninterrupted_run(reference_run,
                                                                                             synthetic_workdir):
    experiment = synthetic_workdir / 'experiments' / 'resume_sigterm'
    process = _start(synthetic_workdir, FINETUNE, 'resume_sigterm', FINETUNE_RUN)
    _wait_for(lambda: 4 in _states(experiment), process)  # mid-epoch (iteration 4 of 3 per epoch)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert 'training stopped by SIGTERM after iteration' in output and 'continue with --auto_resume' in output
    stopped_at = max(_states(experiment))
    assert stopped_at < 12 and (experiment / 'models' / f'net_{stopped_at}.pth').is_file()

    status, log = _resume_here(synthetic_workdir, FINETUNE, 'resume_sigterm', FINETUNE_RUN)
    assert status == 0, log[-3000:]
    assert f'resuming from {experiment / "training_states" / f"{stopped_at}.state"}' in log
    _assert_same_weights(reference_run(), experiment, ('net_latest.pth', 'net_best.pth', 'net_12.pth'))


def _checkpoint_being_written(experiment):
    return any(p.name.endswith('.tmp') for folder in ('models', 'training_states')
               for p in (experiment / folder).glob('.*') if (experiment / folder).is_dir())


def test_sigkill_at_random_moments_then_auto_resume_matches_the_uninterrupted_run(reference_run, synthetic_workdir):
    experiment = synthetic_workdir / 'experiments' / 'resume_sigkill'
    chooser = random.Random(0)
    # First kill: the moment a checkpoint's temporary file exists (while it is being written); then at a random
    # moment after a random number of further states.
    process = _start(synthetic_workdir, FINETUNE, 'resume_sigkill', FINETUNE_RUN)
    _wait_for(lambda: bool(_states(experiment)) and _checkpoint_being_written(experiment), process)
    process.kill()
    process.communicate(timeout=TIMEOUT)
    process = _start(synthetic_workdir, FINETUNE, 'resume_sigkill', FINETUNE_RUN, '--auto_resume')
    target = max(_states(experiment), default=0) + chooser.randint(1, 3)
    _wait_for(lambda: target in _states(experiment), process)
    time.sleep(chooser.uniform(0, 0.3))
    process.kill()
    process.communicate(timeout=TIMEOUT)
    status, log = _resume_here(synthetic_workdir, FINETUNE, 'resume_sigkill', FINETUNE_RUN)
    assert status == 0, log[-3000:]
    assert not _checkpoint_being_written(experiment), 'temporary files of killed writes are removed on resume'
    _assert_same_weights(reference_run(), experiment, ('net_latest.pth', 'net_best.pth', 'net_12.pth'))


def test_meta_training_stopped_by_sigterm_resumes_to_the_same_theta(synthetic_workdir):
    reference = _start(synthetic_workdir, META, 'meta_reference', META_RUN)  # alongside, on the other core
    try:
        experiment = synthetic_workdir / 'experiments' / 'meta_sigterm'
        process = _start(synthetic_workdir, META, 'meta_sigterm', META_RUN)
        _wait_for(lambda: 6 in _states(experiment), process)  # inside the second round: snapshot sums pending
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
        status, log = _resume_here(synthetic_workdir, META, 'meta_sigterm', META_RUN)
        assert status == 0, log[-3000:]
        _assert_same_weights(_finished(reference, synthetic_workdir / 'experiments' / 'meta_reference'), experiment)
    finally:
        if reference.poll() is None:  # the test failed before waiting for it
            reference.kill()
            reference.communicate()


def test_auto_resume_skips_cut_short_states_and_temporary_files_naming_each(tmp_path):
    states, models = tmp_path / 'training_states', tmp_path / 'models'
    states.mkdir()
    models.mkdir()
    for iteration in (2, 4, 6):
        atomic_torch_save({'epoch': 0, 'iter': iteration}, str(states / f'{iteration}.state'))
        torch.save({'params': {}}, models / f'net_{iteration}.pth')
    whole = (states / '6.state').read_bytes()
    (states / '6.state').write_bytes(whole[:len(whole) // 2])  # cut short by a kill
    (states / '.8.state.x1.tmp').write_bytes(whole)  # a write that never finished
    os.remove(models / 'net_4.pth')  # weights missing: its state cannot be used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        path, state = find_resume_state(str(states), lambda it: str(models / f'net_{it}.pth'))
    assert path == str(states / '2.state') and state['iter'] == 2
    messages = [str(w.message) for w in caught]
    assert any(m.startswith('skipping training state 6.state: cannot be read (cut short?)') for m in messages)
    assert any(m.startswith('skipping training state 4.state: its weights') for m in messages)
    assert not any('.8.state' in m for m in messages)


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / 'net_1.pth'
    atomic_torch_save({'params': {'w': torch.ones(2)}}, str(target))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_torch_save({'params': Unpicklable()}, str(target))
    assert torch.equal(_weights(target)['w'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['net_1.pth']


def _main_in(workdir, argv):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return main(argv)
    finally:
        os.chdir(cwd)


def test_resume_under_a_changed_split_fails_naming_the_option(reference_run, synthetic_workdir, capsys):
    reference_run()
    argv = _command(FINETUNE, 'resume_reference', [*FINETUNE_RUN, 'datasets:train:split_seed=3'], '--auto_resume')
    assert _main_in(synthetic_workdir, argv[3:]) == 2
    assert 'datasets.train.split_seed: 0 in the state, 3 now' in capsys.readouterr().err


def test_fingerprint_names_network_batch_and_world_size_changes():
    opt = {'model_type': 'GRMPFinetuneModel', 'manual_seed': 1, 'world_size': 1, 'network': {'type': 'GRMPIQA', 'crop': 112},
           'datasets': {'train': {'batch_size_per_gpu': 32, 'num_worker_per_gpu': 0}}}
    saved = resume_fingerprint(opt)
    loader_only = dict(opt, datasets={'train': {'batch_size_per_gpu': 32, 'num_worker_per_gpu': 4}})
    check_resume_fingerprint(saved, resume_fingerprint(loader_only), 'x.state')  # workers do not change the run
    for changed, name in [(dict(opt, network={'type': 'GRMPIQA', 'crop': 224}), 'network.crop'),
                          (dict(opt, datasets={'train': {'batch_size_per_gpu': 16}}), 'datasets.train.batch_size_per_gpu'),
                          (dict(opt, world_size=2), 'world_size')]:
        with pytest.raises(ResumeError, match=name):
            check_resume_fingerprint(saved, resume_fingerprint(changed), 'x.state')


@pytest.mark.parametrize('config, overrides', [
    (FINETUNE, ['train:total_epoch=1']),
    (META, ['network:backbone_pretrained=~', 'train:total_epoch=1']),
], ids=['finetune', 'meta'])
def test_run_without_validation_ends_with_status_0_and_net_latest(synthetic_workdir, tmp_path, config, overrides):
    import yaml

    options = yaml.safe_load(config.read_text())
    del options['val']
    options['datasets'] = {'train': options['datasets']['train']}
    no_val = tmp_path / 'no_val.yml'
    no_val.write_text(yaml.safe_dump(options))
    name = f'no_val_{config.stem}'
    assert _main_in(synthetic_workdir, _command(no_val, name, overrides)[3:]) == 0
    assert (synthetic_workdir / 'experiments' / name / 'models' / 'net_latest.pth').is_file()
