"""What `pip install vera_jax` puts in site-packages, and features used without their extra."""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import subprocess
import sys

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_the_library_is_installed():
    """experiments/ and configs/ run from the repository; as top-level packages in site-packages
    they would take names any other project may use."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(str(ROOT), include=include)
    assert "vera_jax" in packages and "vera_jax.models" in packages
    assert all(p == "vera_jax" or p.startswith("vera_jax.") for p in packages), packages


def test_test_extra_pulls_every_feature_extra():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert {"serving", "nlg", "gguf"} <= set(extras)
    assert "vera_jax[serving,nlg,gguf]" in extras["test"].split()


CHILD = """
import json, sys
for name in ("fastapi", "uvicorn", "gguf", "sacrebleu", "pycocoevalcap"):
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
out = {}
def attempt(key, fn):
    try:
        fn()
        out[key] = "no error"
    except ImportError as e:
        out[key] = str(e)
attempt("serving", lambda: __import__("vera_jax.serving.__main__"))
attempt("gguf", lambda: __import__("vera_jax.models.gguf"))
from vera_jax.metrics import nlg
attempt("nlg", lambda: nlg.bleu(["a b"], [["a b"]]))
print(json.dumps(out))
"""


def test_a_feature_without_its_extra_names_the_extra():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for extra, module in [("serving", "fastapi"), ("gguf", "gguf"), ("nlg", "sacrebleu")]:
        assert f"needs '{module}', which is not installed" in out[extra], out
        assert f'pip install "vera_jax[{extra}]"' in out[extra], out


CONFIGS = """
import importlib, json, pathlib, sys
loaded = []
for path in sorted(pathlib.Path("configs").rglob("*.py")):
    if path.name == "__init__.py":
        continue
    module = importlib.import_module(".".join(path.with_suffix("").parts))
    if hasattr(module, "get_config"):
        module.get_config()
        loaded.append(str(path))
print(json.dumps({"loaded": loaded, "heavy": sorted(m for m in ("jax", "flax", "numpy") if m in sys.modules)}))
"""


def test_loading_a_config_does_not_import_jax():
    """Every config file imports and builds (get_config) with plain ml_collections: a sweep
    tool, a config check or `--help` never waits for JAX."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CONFIGS], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "configs/minilm_sst2.py" in out["loaded"] and len(out["loaded"]) > 30, out
    assert out["heavy"] == [], out
