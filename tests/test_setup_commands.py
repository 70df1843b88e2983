"""The CI script runs exactly the README's install and test commands."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    readme = (ROOT / 'README.md').read_text()
    setup_block = re.search(r'## Set-up.*?```bash\n(.*?)```', readme, re.S).group(1).strip().splitlines()
    ci_lines = [line for line in (ROOT / '.ci' / 'run').read_text().splitlines()
                if line and not line.startswith(('#', 'set ', 'cd ', 'export '))]
    assert len(setup_block) == 2
    assert ci_lines == setup_block
