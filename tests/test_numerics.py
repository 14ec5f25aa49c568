"""The numeric mode (cm3leon/numerics.py): which kernels a stage process runs, and that the
reproducible mode gives the same bytes when the CPU would have offered other kernels."""

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm3leon import numerics
from cm3leon.artifacts import folder_digest
from cm3leon.training.run_key import run_key

from conftest import run

OTHER_CPU = numerics.OTHER_CPU_KERNELS


@pytest.fixture(autouse=True)
def _process_state(monkeypatch):
    """pin() records what it did for the process: keep that out of the other tests."""
    monkeypatch.setattr(numerics, "_state", None)


def test_reproducible_mode_pins_every_kernel_variable_and_says_what_it_overrode(capsys):
    environ = {"MKL_CBWR": "COMPATIBLE", "PATH": "/bin"}
    state = numerics.pin("reproducible", 3, environ, unsupported=None)
    if state.reason is not None:
        pytest.skip(f"reproducible pins unavailable here: {state.reason}")
    assert environ == {**numerics.pinned_environment(3), "PATH": "/bin"}
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "3"
    assert state.mode == "reproducible" and state.changed
    assert state.overridden == (("MKL_CBWR", "COMPATIBLE"),)
    assert "sets MKL_CBWR=AVX2 (was COMPATIBLE)" in capsys.readouterr().err
    again = numerics.pin("reproducible", 3, environ)
    assert not again.changed and again.overridden == ()  # a re-executed process: nothing to do
    record = numerics.record()
    assert record["mode"] == "reproducible" and "reason" not in record


def test_fast_mode_and_unsupported_cpus_leave_the_environment_alone(capsys):
    environ = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert numerics.pin("fast", 2, environ) == numerics.NumericsState("fast", "fast", None)
    assert environ == {"ATEN_CPU_CAPABILITY": "avx512"}
    state = numerics.pin("reproducible", 2, environ, unsupported="the CPU lacks avx2")
    assert (state.mode, state.requested, state.changed) == ("fast", "reproducible", False)
    assert environ == {"ATEN_CPU_CAPABILITY": "avx512"}
    assert "the CPU lacks avx2: this process runs the fast kernels" in capsys.readouterr().err
    record = numerics.record()
    assert record["mode"] == "fast" and record["requested"] == "reproducible"
    with pytest.raises(ValueError, match=r"base\.numerics\.mode"):
        numerics.pin("exact", 2, {})


def test_which_cpus_can_hold_the_pins():
    assert numerics.unsupported_reason("x86_64", {"avx2", "fma", "sse4_2"}) is None
    assert "not x86-64" in numerics.unsupported_reason("aarch64", {"asimd"})
    assert numerics.unsupported_reason("x86_64", {"sse4_2", "fma"}) == "the CPU lacks avx2"
    assert "cannot be read" in numerics.unsupported_reason("AMD64", None)


def test_the_mode_is_read_from_the_params_file_the_stage_is_given(tmp_path):
    params = tmp_path / "p.yaml"
    assert numerics.params_path(["--params", str(params), "--out", "x"]) == str(params)
    assert numerics.params_path(["--params=a.yaml"]) == "a.yaml"
    assert numerics.params_path(["--out", "x"]) == "params.yaml"
    params.write_text(yaml.safe_dump({"base": {"seed": 1}}))
    assert numerics.read_numerics(params) == (numerics.DEFAULT_MODE, numerics.DEFAULT_THREADS)
    params.write_text(yaml.safe_dump({"base": {"numerics": {"mode": "fast", "threads": 4}}}))
    assert numerics.read_numerics(params) == ("fast", 4)
    params.write_text(yaml.safe_dump({"base": {"numerics": {"mode": "exact"}}}))
    assert numerics.read_numerics(params) is None  # load_params names the key, not this
    assert numerics.read_numerics(tmp_path / "missing.yaml") is None


def test_a_checkpoint_of_one_mode_is_not_resumed_in_the_other(tmp_path, monkeypatch):
    from cm3leon.config import BaseConfig

    monkeypatch.setattr(numerics, "_state", numerics.NumericsState("fast", "fast", None))
    fast = run_key(BaseConfig(), 1, [], [])
    pinned = numerics.NumericsState("reproducible", "reproducible", 2)
    monkeypatch.setattr(numerics, "_state", pinned)
    assert run_key(BaseConfig(), 1, [], []) != fast


def _tokenize(root, mode: str, env: dict[str, str], name: str):
    """Run the tokenize stage script in ``mode`` with ``env`` added; (weights sha256, VQ config
    with the tokens' digest added, stderr)."""
    values = yaml.safe_load((root / "params.yaml").read_text())
    values["base"]["numerics"]["mode"] = mode
    (root / f"{name}.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    out = root / "out" / name
    cmd = ["python", "stages/tokenize_corpus.py", "--params", f"{name}.yaml"]
    cmd += ["--corpus", "data/corpus", "--validation", "reports/validation/metrics.json"]
    for flag, path in (
        ("vq-out", "vq"),
        ("text-out", "text"),
        ("tokens-out", "tokens"),
        ("metrics", "metrics.json"),
        ("grid", "grid.png"),
        ("live", "live"),
    ):
        cmd += [f"--{flag}", str(out / path)]
    proc = run_with(cmd, root, env)
    weights = hashlib.sha256((out / "vq" / "model.safetensors").read_bytes()).hexdigest()
    config = json.loads((out / "vq" / "config.json").read_text())
    config["tokens"] = folder_digest(out / "tokens")  # every document's codes
    return weights, config, proc.stderr


def run_with(cmd, root, extra):
    """``cmd`` in ``root`` with none of the kernel variables of this process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.KERNEL_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(
    numerics.unsupported_reason(platform.machine(), numerics.cpu_flags()) is not None,
    reason="the reproducible pins need an x86-64 CPU with AVX2 and FMA",
)
def test_other_kernels_change_the_fast_modes_bytes_and_not_the_reproducible_ones(make_project):
    """The tokenize stage's VQ weights (convolutions, matmuls, elementwise kernels), trained
    under the kernels this CPU offers and under those another CPU would offer."""
    root = make_project()
    run(["python", "stages/prepare.py", "--params", "params.yaml", "--out", "data/corpus"], root)
    validate = ["--corpus", "data/corpus", "--out", "reports/validation"]
    run(["python", "stages/validate.py", *validate], root)
    fast, _, _ = _tokenize(root, "fast", {}, "fast")
    fast_other, _, _ = _tokenize(root, "fast", OTHER_CPU, "fast_other")
    pinned, config, _ = _tokenize(root, "reproducible", {}, "pinned")
    pinned_other, other_config, err = _tokenize(root, "reproducible", OTHER_CPU, "pinned_other")
    assert fast_other != fast  # fast: the bytes depend on the kernels the CPU offers
    assert pinned_other == pinned  # reproducible: they do not
    assert "reproducible mode sets ATEN_CPU_CAPABILITY=avx2 (was default)" in err
    for recorded in (config, other_config):  # the environment the weights were computed in
        env = recorded["environment"]
        assert env["numerics"]["mode"] == "reproducible"
        assert env["numerics"]["variables"]["MKL_CBWR"] == "AVX2"
        assert env["cpu_capability"] == "AVX2" and env["threads"] == numerics.DEFAULT_THREADS
        assert env["cpu"] == "any x86-64 with AVX2 (reproducible numerics)"
    assert config == other_config  # so the VQ's fingerprint, and every token, agree too
    assert config["tokens"] == other_config["tokens"]
