"""`pipeline cp NAME DEST` and the shipped recipes as package data (a wheel holds them as `pipeline_recipes`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main, shipped_recipes

ROOT = Path(__file__).resolve().parent.parent


def test_cp_into_a_folder_and_to_a_yaml_file(tmp_path, capsys):
    assert main(["cp", "quickstart", str(tmp_path / "mine")]) == 0  # a folder that does not exist yet
    out = capsys.readouterr().out
    written = tmp_path / "mine" / "quickstart.yaml"
    assert written.read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    # the copy's data paths are relative to where it runs: the command names them
    assert "sft.data: data/constraints/sft.jsonl" in out and "eval.prompts: eval/constraints/heldout.jsonl" in out

    assert main(["cp", "sft.yaml", str(tmp_path / "other.yaml")]) == 0  # `NAME.yaml` works too
    assert (tmp_path / "other.yaml").read_bytes() == (ROOT / "recipes" / "sft.yaml").read_bytes()

    assert main(["cp", "accelerate/multi_gpu_ddp", str(tmp_path)]) == 0
    assert (tmp_path / "multi_gpu_ddp.yaml").read_bytes() == \
        (ROOT / "recipes" / "accelerate" / "multi_gpu_ddp.yaml").read_bytes()


def test_cp_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "quickstart.yaml"
    dest.write_text("mine: keep\n")
    assert main(["cp", "quickstart", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and str(dest) in err and "Traceback" not in err
    assert dest.read_text() == "mine: keep\n"

    assert main(["cp", "quickstart", str(dest), "--force"]) == 0
    assert dest.read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()


def test_cp_unknown_name_lists_the_shipped_ones(tmp_path, capsys):
    assert main(["cp", "quickstrat", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Did you mean `quickstart`?" in err and "Traceback" not in err
    for name in ("quickstart", "sft", "ppo", "accelerate/fsdp"):
        assert name in err
    assert not list(tmp_path.iterdir())


def test_cp_dest_that_is_a_file_without_yaml_suffix(tmp_path, capsys):
    dest = tmp_path / "notes.txt"
    dest.write_text("x")
    assert main(["cp", "quickstart", str(dest)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert dest.read_text() == "x"


def test_shipped_names_cover_every_recipe_file():
    names = shipped_recipes()
    files = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert sorted(f"{n}.yaml" for n in names) == files
    assert next(iter(names)) == "distill" and list(names)[-1].startswith("accelerate/")  # recipes first


def _wheel_source(tmp_path: Path) -> Path:
    """The files a wheel is built from, copied so that the build writes nothing into the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    return src


def test_wheel_ships_the_package_and_the_recipes_and_cp_works_from_it(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip("setuptools < 70.1 builds wheels only with the `wheel` package")
    src = _wheel_source(tmp_path)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    # every module of the package (a subpackage missing from pyproject's `packages` would be absent) ...
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    assert modules - names == set()
    # ... and every recipe, as the data-only package `pipeline_recipes`
    recipes = {"pipeline_recipes/" + p.relative_to(ROOT / "recipes").as_posix()
               for p in (ROOT / "recipes").rglob("*.yaml")}
    assert recipes - names == set() and "pipeline_recipes/quickstart.yaml" in recipes

    # Installed (unpacked) outside any checkout: `pipeline cp` finds the recipes in the installed package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    path = [str(site)] + [p for p in sys.path
                          if p and Path(p).resolve() != ROOT and ROOT not in Path(p).resolve().parents]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    work = tmp_path / "work"
    work.mkdir()
    # -S: no .pth files, so the editable install of this checkout (if any) cannot supply `pipeline`
    run = subprocess.run([sys.executable, "-S", "-m", "pipeline", "cp", "quickstart", "out/"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert str(site / "pipeline_recipes" / "quickstart.yaml") in run.stdout
    assert (work / "out" / "quickstart.yaml").read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    listing = subprocess.run([sys.executable, "-S", "-m", "pipeline", "recipes"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert listing.returncode == 0 and "quickstart.yaml" in listing.stdout, listing.stderr
