"""Packaging: every import the code makes is declared in pyproject.toml, ``moca_kernels`` imports
with torch and triton alone, and the version has one source."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap

import tomllib

import moca
import moca_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"moca", "moca_kernels"}
KERNEL_DEPENDENCIES = {"torch", "triton"}  # all that moca_kernels may import when it is imported
# moca_kernels' integrations with other libraries: each imports its library (from the extra named)
INTEGRATIONS = {"moca_kernels/transformers.py": "hf"}
# import name -> distribution name, where they differ beyond - and _
DISTRIBUTIONS = {"PIL": "pillow", "flash_attn": "flash-attn", "nvidia": "nvidia-dali", "yaml": "pyyaml"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict) -> dict[str, set[str]]:
    """{"": the base dependencies, extra: its requirements}, as normalized distribution names."""
    project = pyproject["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: {_normal(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in reqs} for group, reqs in groups.items()}


def imports(source: str) -> list[tuple[str, bool]]:
    """(top-level module, eager) of each absolute import in ``source``; eager: at the module's top
    level, run by importing it (not inside a function, a try block or ``if TYPE_CHECKING``)."""
    tree = ast.parse(source)
    eager = {id(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in eager) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in eager))
    return found


def optional(source: str) -> set[str]:
    """Top-level modules that ``source`` only tries: imported inside a try block, or named in a
    ``pytest.importorskip`` call (a test that skips where they are missing)."""
    tree, found = ast.parse(source), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            found |= {m for statement in node.body for m, _ in imports(ast.unparse(statement))}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value.split(".")[0])
    return found


def distribution(module: str, declared: set[str]) -> str | None:
    """The declared distribution that provides ``module``, or None."""
    name = _normal(DISTRIBUTIONS.get(module, module))
    return next((d for d in sorted(declared) if d == name or d.startswith(name + "-")), None)


def problems(files: dict[str, str], groups: dict[str, set[str]], local: frozenset = frozenset()) -> list[str]:
    """What is wrong with the imports of ``files`` ({path relative to the root: source}): a
    third-party module no requirement provides; one that ``moca`` imports eagerly but only an extra
    provides; anything but torch and triton that ``moca_kernels`` imports eagerly; one that the
    tests import but the test extra does not install. ``local``: the repository's own script
    modules (the tests', the benchmarks'), not packages."""
    everything = set().union(*groups.values())
    found = []
    for path, source in sorted(files.items()):
        tried = optional(source) if path.startswith("tests/") else set()
        for module, eager in dict.fromkeys(imports(source)):
            if module in sys.stdlib_module_names or module in FIRST_PARTY | local | tried or module == "__future__":
                continue
            if distribution(module, everything) is None:
                found.append(f"{path}: imports {module}, which no requirement in pyproject.toml provides")
            elif path in INTEGRATIONS and distribution(module, groups[INTEGRATIONS[path]]):
                continue
            elif path.startswith("moca_kernels") and eager and module not in KERNEL_DEPENDENCIES:
                found.append(f"{path}: imports {module} on import; moca_kernels needs torch and triton alone")
            elif path.startswith("moca/") and eager and distribution(module, groups[""]) is None:
                found.append(f"{path}: imports {module} on import, but only an extra provides it")
            elif path.startswith("tests/") and distribution(module, groups[""] | groups["test"]) is None:
                found.append(f"{path}: imports {module}, which the test extra does not install")
    return found


def _sources(*folders: str) -> dict[str, str]:
    files = {}
    for folder in folders:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(base, name)
                    with open(path) as f:
                        files[os.path.relpath(path, ROOT)] = f.read()
    return files


def _scripts(*folders: str) -> frozenset:
    """The module names of the .py files under ``folders`` (imported by path, as scripts)."""
    return frozenset(os.path.splitext(os.path.basename(p))[0] for p in _sources(*folders))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_import_is_declared():
    local = _scripts("tests", "benchmarks")
    assert problems(_sources("moca", "moca_kernels", "tests"), requirements(_pyproject()), local) == []


def test_the_import_check_finds_what_is_missing():
    groups = {"": {"torch", "triton", "pillow"}, "test": {"pytest"}, "extra": {"wandb"}}
    files = {"moca/a.py": "import tqdm\nfrom PIL import Image\n\ndef f():\n    import wandb\n",
             "moca/b.py": "import wandb\n",
             "moca_kernels/c.py": "import torch\nimport PIL\n\ndef f():\n    import flash_attn\n",
             "tests/test_d.py": "import pytest\nimport hypothesis\n",
             "tests/test_e.py": "import pytest\ntry:\n    import vision\nexcept ImportError:\n    pass\n\n"
                                "def test():\n    pytest.importorskip('bench.sub')\n    from bench.sub import x\n"}
    assert problems(files, groups) == [
        "moca/a.py: imports tqdm, which no requirement in pyproject.toml provides",
        "moca/b.py: imports wandb on import, but only an extra provides it",
        "moca_kernels/c.py: imports PIL on import; moca_kernels needs torch and triton alone",
        "moca_kernels/c.py: imports flash_attn, which no requirement in pyproject.toml provides",
        "tests/test_d.py: imports hypothesis, which no requirement in pyproject.toml provides"]


def test_moca_kernels_imports_with_torch_and_triton_alone():
    """Every third-party module that moca imports (numpy too: torch and triton import without it)
    is made unimportable, then every module of moca_kernels is imported (but the integrations,
    which import their own library)."""
    blocked = sorted({m for m, _ in imports("\n".join(_sources("moca").values()))
                      if m not in sys.stdlib_module_names and m not in FIRST_PARTY | KERNEL_DEPENDENCIES}
                     | {"moca", "numpy", "transformers", "PIL", "tqdm", "matplotlib"})
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import raises ModuleNotFoundError; importlib.util.find_spec says None
        import moca_kernels
        names = [m.name for m in pkgutil.walk_packages(moca_kernels.__path__, "moca_kernels.")
                 if m.name.replace(".", "/") + ".py" not in {sorted(INTEGRATIONS)!r}]
        for name in names:
            importlib.import_module(name)
        print(len(names), "modules")
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[0]) >= 20  # the walk reached the op packages' modules


def test_one_version():
    pyproject = _pyproject()
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moca_kernels.__version__"}
    assert moca.__version__ == moca_kernels.__version__ == importlib.metadata.version(pyproject["project"]["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", moca_kernels.__version__)
    with open(os.path.join(ROOT, "moca", "__init__.py")) as f:
        assert "__version__ =" not in f.read()  # moca's version is moca_kernels'


def test_distribution_name_is_the_one_documented():
    name = _pyproject()["project"]["name"]
    assert name == "moca-kernels"  # "moca" on the package index is another project
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"distribution `{name}`" in f.read()
