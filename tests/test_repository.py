"""The README's set-up commands and CI stay the same command."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert block[0].startswith("# run the main job") and block[2] == "# run the tests"
    assert "accelerate launch recipes/finetune_llm.py" in block[1]
    ci_commands = [line for line in read(".ci/run").splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [block[3]]
