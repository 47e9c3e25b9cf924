"""A non-editable install (`pip install .`) carries what the package reads at run time: the
presets and the ds_configs (installed under <prefix>/share/lora_ppo/ds_configs)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

from lora_ppo.runtime.ds_config import DS_CONFIG_DIR


@pytest.mark.slow
def test_wheel_ships_presets_and_every_ds_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("lora_ppo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lora_ppo/builtin/presets/demo.yaml" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if "/share/lora_ppo/ds_configs/" in n}
    assert shipped == {p.name for p in DS_CONFIG_DIR.glob("*.json")}


def test_constraints_pin_every_dependency_within_its_range():
    """scripts/setup.sh installs constraints.txt (the tested versions); each runtime and dev
    dependency of pyproject.toml must be pinned there, inside the range users install from."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] +
              project["optional-dependencies"]["dev"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    for req in wanted:
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(version, prereleases=True), (str(req), version)
    assert "-c constraints.txt" in (REPO / "scripts" / "setup.sh").read_text()
