"""Checks with the authors' real checkpoint; run with GRMP_IQA_WEIGHTS=/path/to/clive_50_prompt_lda_5.0.pt."""
import os

import numpy as np
import pyiqa
import pytest
import torch
from PIL import Image, ImageFilter

from grmp_test_utils import photo

pytestmark = pytest.mark.realweights


@pytest.fixture(scope='module')
def metric():
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=os.environ.get('GRMP_IQA_WEIGHTS'))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.mark.parametrize('name', ['astronaut', 'chelsea', 'coffee'])
def test_heavy_blur_lowers_the_score(metric, name):
    clean = Image.fromarray(photo(name))
    blurred = clean.filter(ImageFilter.GaussianBlur(8))
    assert metric(_tensor(clean)).item() > metric(_tensor(blurred)).item()
