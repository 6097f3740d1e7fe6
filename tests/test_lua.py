"""The Lua scripts: every file the loader's table names exists, and a built (non-editable) copy of the
package carries them, so an installed casimg can load every script."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

from casimg import lua

ROOT = Path(__file__).resolve().parent.parent


def test_every_part_named_in_the_table_is_a_package_resource():
    files = resources.files("casimg.lua")
    for script, parts in lua.SCRIPTS.items():
        assert parts[-1] == script, f"{script}: its own file comes last"
        for part in parts:
            assert files.joinpath(f"{part}.lua").is_file(), f"{script}: no {part}.lua in casimg/lua"


def test_every_lua_file_is_used_by_some_script():
    used = {part for parts in lua.SCRIPTS.values() for part in parts}
    present = {path.stem for path in (ROOT / "casimg" / "lua").glob("*.lua")}
    assert present == used


def test_a_built_copy_of_the_package_loads_every_script(tmp_path):
    # build_py copies what an install copies (the packages and their package data) into build/lib
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT, check=True, capture_output=True,
    )
    check = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import casimg.lua as lua, pathlib\n"
        f"assert pathlib.Path(lua.__file__).is_relative_to({str(tmp_path)!r}), lua.__file__\n"
        "print(sum(len(lua.source(name)) > 0 for name in lua.SCRIPTS))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(lua.SCRIPTS)
