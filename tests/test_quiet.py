"""A refused run that loads a model still answers with one stderr line: library chatter
(bitsandbytes, its `kernels` hub loader, datasets, DeepSpeed) is silenced where the CLI starts."""

from __future__ import annotations

import shutil

import pytest
from helpers import run_cli


@pytest.mark.integration
def test_refused_4bit_load_is_one_stderr_line(tiny_model_dir, tmp_path, low_ids_reward):
    # bitsandbytes is imported while the 4-bit base loads; `kernels` >= 0.19 then warns that it
    # skips its publisher trust check offline (HF_HUB_OFFLINE=1, as in conftest), unless silenced.
    model = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    res = run_cli("train", f"model.path={model}", f"output_dir={tmp_path / 'out'}",
                  "quantization.mode=4bit", f"reward.function={low_ids_reward}",
                  "data.prompts=builtin:reviews",
                  env={"HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "check that its weight files are complete" in lines[0], lines
    assert not (tmp_path / "out").exists()
