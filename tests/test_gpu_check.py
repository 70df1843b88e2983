"""benchmarks/gpu_check.sh: argument parsing, file checks and the plan (--check-only); the check itself runs on a
GPU machine, and its --dry-run by hand (it takes minutes)."""
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.sh'
STEPS = ['environment', 'pytest -m gpu', 'inference fp32', 'inference bf16', 'inference fp16',
         'score difference vs fp32', 'fine-tuning step ratio', 'meta-training peak memory', 'score end to end',
         'score throughput (mixed-size JPEGs)', 'distributed benchmark, 1 rank']


def _run(*args, cwd=ROOT):
    return subprocess.run(['bash', str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fake_root(tmp_path):
    """A repository root whose wheel list names two small files written here, with their real sha256."""
    root = tmp_path / 'repo'
    for folder in ('pyiqa_grmp', 'tests', 'benchmarks', 'wheels'):
        (root / folder).mkdir(parents=True)
    (root / 'pyiqa_grmp' / '__init__.py').write_text('')
    for script in ('inference.py', 'precision.py', 'finetune_step.py', 'meta_pretrain.py', 'score_folder.py',
                   'score_throughput.py', 'distributed.py'):
        shutil.copy(ROOT / 'benchmarks' / script, root / 'benchmarks' / script)
    lines = ['# a comment']
    for name in ('a-1.0-py3-none-any.whl', 'b-2.0-py3-none-any.whl'):
        (root / 'wheels' / name).write_bytes(name.encode())
        lines.append(f'{hashlib.sha256(name.encode()).hexdigest()}  {name}')
    (root / 'benchmarks' / 'gpu_wheels.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_without_a_wheel_folder_it_exits_2_with_the_usage():
    result = _run()
    assert result.returncode == 2
    assert 'give the folder of wheels' in result.stderr and 'usage:' in result.stderr


def test_unknown_option_exits_2_naming_it():
    result = _run('--fast')
    assert result.returncode == 2 and 'unknown option --fast' in result.stderr


def test_dry_run_plan_lists_every_step_on_cpu_and_runs_nothing():
    result = _run('--check-only', '--dry-run')
    assert result.returncode == 0, result.stderr
    plan = [line for line in result.stdout.splitlines() if line.startswith('step: ')]
    assert len(plan) == len(STEPS)
    for line, name in zip(plan, STEPS):
        assert line.startswith(f'step: {name}')
    assert 'inference fp16, batch 4 (skipped: fp16 runs on CUDA only)' in result.stdout
    assert '--device cpu' in result.stdout and 'nothing was run' in result.stdout


def test_gpu_plan_checks_the_listed_wheels_and_runs_on_cuda(fake_root):
    result = _run('--check-only', 'wheels', cwd=fake_root)
    assert result.returncode == 0, result.stderr
    assert '--device cuda --backbone ViT-B-16-quickgelu' in result.stdout
    assert '--batch 64 --precision fp16' in result.stdout


def test_missing_wheel_is_named(fake_root):
    (fake_root / 'wheels' / 'b-2.0-py3-none-any.whl').unlink()
    result = _run('--check-only', 'wheels', cwd=fake_root)
    assert result.returncode == 2 and 'lacks: b-2.0-py3-none-any.whl' in result.stderr


def test_wheel_with_another_content_is_refused(fake_root):
    (fake_root / 'wheels' / 'a-1.0-py3-none-any.whl').write_bytes(b'tampered')
    result = _run('--check-only', 'wheels', cwd=fake_root)
    assert result.returncode == 2 and 'does not match its sha256' in result.stderr


def test_outside_the_repository_root_it_exits_2(tmp_path):
    result = _run('--check-only', '--dry-run', cwd=tmp_path)
    assert result.returncode == 2 and 'run from the repository root' in result.stderr


def test_missing_benchmark_script_fails_the_plan(fake_root):
    (fake_root / 'benchmarks' / 'precision.py').unlink()
    result = _run('--check-only', 'wheels', cwd=fake_root)
    assert result.returncode == 2 and 'missing script for step score difference vs fp32' in result.stderr
