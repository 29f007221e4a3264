"""The README's Python snippets run as written, and say what they compute."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run_and_their_shapes_hold():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    torch.manual_seed(0)
    for block in blocks:  # in order, one namespace: later snippets use earlier names
        exec(compile(block, str(README), "exec"), ns)
    assert ns["out"].shape == (100, 64, 128)
    assert ns["state"].h.shape == ns["state"].c.shape == (1, 64, 128)
    att = ns["att"]
    assert att.summary.shape == (100, 64, 128)
    assert att.weights.shape == att.indices.shape == att.memory_steps.shape == (100, 64, 5)
    res = ns["res"]  # the sparse engine, a loss at the last step
    assert res.loss.ndim == 0 and res.state.step == 100
    assert 0 < res.stats["steps_backpropagated"] <= 100
