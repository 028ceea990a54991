"""Ships dfloat-autoload.pth into site-packages (pyproject.toml has everything else): see _dfloat_autoload.py.

A .pth file must sit at the top of site-packages, which setuptools has no declarative option for: the build_py
step copies it beside the packages (wheels), and the editable wheel (`pip install -e`) gets it written in too.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "dfloat-autoload.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class _AddPth:
    """An editable-install strategy that also writes the .pth into the wheel."""

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, wheel, files, mapping):
        result = self._inner(wheel, files, mapping)
        wheel.writestr(PTH, Path(PTH).read_text())
        return result

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class EditableWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _AddPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})
