"""Shared helpers for the tests: tiny backbones, bundled photos, checkpoints written on the fly, and the one way
tests launch commands (environment, torchrun, timeouts)."""
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

TINY_BACKBONE: Dict = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 224, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 16},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 2},
}
TINY_NUM_PROMPTS = 5


def tiny_model_kwargs(**overrides) -> Dict:
    """GRMPIQA kwargs for a tiny random model that loads nothing."""
    kwargs = dict(backbone=TINY_BACKBONE, backbone_pretrained=None, num_visual_prompts=TINY_NUM_PROMPTS,
                  pretrained=False)
    kwargs.update(overrides)
    return kwargs


def photo(name: str = 'astronaut') -> np.ndarray:
    """A bundled scikit-image photo as uint8 HxWx3 (or HxW for grey ones)."""
    from skimage import data

    return getattr(data, name)()


def photo_tensor(name: str = 'astronaut', size=None) -> torch.Tensor:
    """A bundled photo as a (1, 3, H, W) float tensor in [0, 1]."""
    array = photo(name)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    if size is not None:
        tensor = torch.nn.functional.interpolate(tensor, size=size, mode='bilinear', align_corners=False)
    return tensor.clamp(0, 1)


def scores_of(metric_or_net, images: torch.Tensor) -> torch.Tensor:
    """The flat scores a metric or network gives ``images``, without gradients."""
    with torch.no_grad():
        return metric_or_net(images).flatten()


def reference_encode_image(model, pixels: torch.Tensor) -> torch.Tensor:
    """The straightforward VPT-Deep forward: the full [CLS, prompts, patches] sequence through open_clip blocks.

    Kept as the reference that the fast path (prompt keys/values, CLS-only last block) must equal.
    """
    visual = model.clip.visual
    tokens = visual._embeds(pixels)
    batch, num_prompts = pixels.shape[0], model.visual_prompts.num_tokens
    for layer, block in enumerate(visual.transformer.resblocks):
        prompts = model.visual_prompts.tokens(layer, batch)
        if prompts.ndim == 2:
            prompts = prompts.expand(batch, -1, -1)
        rest = tokens[:, 1:] if layer == 0 else tokens[:, 1 + num_prompts:]
        tokens = block(torch.cat([tokens[:, :1], prompts, rest], dim=1))
    cls = visual.ln_post(model.visual_prompts.norm(tokens[:, 0])) @ visual.proj
    return torch.nn.functional.normalize(cls, dim=-1)


def reference_score(model, images: torch.Tensor) -> torch.Tensor:
    """Score through the reference image path and freshly computed text features."""
    image_features = reference_encode_image(model, model.preprocess(images))
    prompts = model.prompt_learner(model.clip.token_embedding)
    text = model._encode_text_embeddings(prompts, model.prompt_learner.token_ids)
    logits = model.clip.logit_scale.exp() * image_features @ text.t()
    return logits.softmax(-1)[:, :1]


def training_options(config_path, workdir, **train_overrides) -> Dict:
    """A smoke YAML as pyiqa's option parser would leave it, with data under ``workdir`` and experiments in
    ``workdir/unit`` (for building models directly, without ``train_pipeline``)."""
    import yaml
    from pyiqa.utils.options import make_paths

    def rooted(value):
        if isinstance(value, dict):
            return {key: rooted(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rooted(item) for item in value]
        if isinstance(value, str) and value.startswith('datasets/'):
            return os.path.join(str(workdir), value)
        return value

    opt = yaml.safe_load(open(config_path).read())
    opt['datasets'] = rooted(opt['datasets'])
    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False)
    for key, value in train_overrides.items():
        if isinstance(value, dict) and isinstance(opt['train'].get(key), dict):
            opt['train'][key] = {**opt['train'][key], **value}
        else:
            opt['train'][key] = value
    make_paths(opt, os.path.join(str(workdir), 'unit'))
    os.makedirs(opt['path']['models'], exist_ok=True)
    os.makedirs(opt['path']['training_states'], exist_ok=True)
    return opt


def tiny_grmp_cli_options(checkpoint) -> list:
    """``--metric-opt`` arguments that make the ``grmp_iqa`` of the CLI the tiny model saved at ``checkpoint``."""
    import yaml

    backbone = yaml.safe_dump(TINY_BACKBONE, default_flow_style=True).strip()
    return ['--metric-opt', f'grmp_iqa:pretrained_model_path={checkpoint}',
            '--metric-opt', f'grmp_iqa:backbone={backbone}',
            '--metric-opt', f'grmp_iqa:num_visual_prompts={TINY_NUM_PROMPTS}']


def free_port() -> int:
    """A TCP port nobody listens on now, for one distributed test's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment of every command a test launches: offline, one thread, unbuffered output, and this
    working tree first on the import path (so the tree under test runs, installed or not)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    env.update(extra)
    return env


def grmp_command(*args: str) -> List[str]:
    """``python -m pyiqa_grmp ARGS`` (the ``pyiqa-grmp`` command) with this interpreter."""
    return [sys.executable, '-m', 'pyiqa_grmp', *args]


def torchrun_command(ranks: int, *args: str) -> List[str]:
    """``torchrun --nproc_per_node RANKS -m pyiqa_grmp ARGS`` on this machine, at a free port."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', str(ranks),
            '--master_addr', '127.0.0.1', '--master_port', str(free_port()), '-m', 'pyiqa_grmp', *args]


def start_command(command: Sequence[str], cwd, **env: str) -> subprocess.Popen:
    """Start a command in its own session (so the whole job can be signalled), stdout and stderr as one text."""
    return subprocess.Popen(list(command), cwd=str(cwd), env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish_command(process: subprocess.Popen, timeout: float) -> Tuple[int, str]:
    """(exit status, output) of a started command; the whole job is killed if it outlives ``timeout``."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, output


def run_command(command: Sequence[str], cwd, timeout: float, **env: str) -> Tuple[int, str]:
    """Run a command to its end: (exit status, stdout and stderr together)."""
    return finish_command(start_command(command, cwd, **env), timeout)


def nested_settings(settings: Dict, path: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], object]]:
    """(path of keys, value) of every setting in a nested mapping, such as a section of presets/paper.yml."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += nested_settings(value, (*path, key))
        else:
            found.append(((*path, key), value))
    return found


def settings_that_differ(options: Dict, settings: Dict) -> Dict[str, Tuple[object, object]]:
    """Each setting of ``settings`` whose value in ``options`` (at the same path of keys) differs:
    'a.b.c' -> (value in options, setting)."""
    def at(path):
        value = options
        for key in path:
            value = value[key]
        return value

    return {'.'.join(path): (at(path), value) for path, value in nested_settings(settings) if at(path) != value}


def run_main(argv: Sequence[str], cwd=None) -> Tuple[int, str, str]:
    """``pyiqa-grmp ARGV`` in this process, from ``cwd``: (exit status, stdout, stderr). An exception that escapes
    the command is printed to stderr as its traceback with status 1, as the interpreter would."""
    import contextlib
    import io
    import traceback

    from pyiqa_grmp.cli import main

    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(argv))
            except SystemExit as exit_:
                status = exit_.code
            except Exception:  # noqa: BLE001  (what the command would have died of)
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def run_logged(argv: Sequence[str], cwd) -> Tuple[int, str]:
    """``pyiqa-grmp ARGV`` run to its end in this process, from ``cwd``, single-threaded as the commands tests
    launch are (``OMP_NUM_THREADS=1``, so that its numbers equal theirs): (exit status, what it printed on stdout
    and stderr, then what reached pyiqa's logger outside a run's own log, one message a line). For runs whose
    launch is not the behaviour under test (a resume, the one-process side of a torchrun equality): it saves an
    interpreter start."""
    import contextlib
    import io
    import logging

    records: List[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger('pyiqa')  # pyiqa's root logger, which the training loop logs to
    level, threads, previous = logger.level, torch.get_num_threads(), os.getcwd()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        from pyiqa_grmp.cli import main

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            status = main(list(argv))
    finally:
        os.chdir(previous)
        torch.set_num_threads(threads)
        logger.setLevel(level)
        logger.removeHandler(handler)
    return status, '\n'.join([printed.getvalue(), *records])
