"""Every public function and method of linmu_cli has type hints (arguments and return), Triton kernels aside."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "linmu_cli"


def _unhinted(path: Path) -> list[str]:
    found = []

    def visit(nodes: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.", True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") and node.name not in ("__init__", "__call__"):
                    continue
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    continue  # @triton.jit: arguments are kernel pointers / constexprs
                a = node.args
                args = a.posonlyargs + a.args + a.kwonlyargs
                if in_class and args and args[0].arg in ("self", "cls"):
                    args = args[1:]
                args += [x for x in (a.vararg, a.kwarg) if x is not None]
                missing = [x.arg for x in args if x.annotation is None]
                if node.returns is None and node.name != "__init__":
                    missing.append("return")
                if missing:
                    found.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {prefix}{node.name}: {missing}"
                    )

    visit(ast.parse(path.read_text()).body, "", False)
    return found


def test_every_public_function_has_type_hints():
    unhinted = [line for path in sorted(PACKAGE.rglob("*.py")) for line in _unhinted(path)]
    assert not unhinted, "\n".join(unhinted)
