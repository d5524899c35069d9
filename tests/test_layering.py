"""The package's imports flow one way, as the README's code map draws it: program (``effdense.train``) and tools
(``effdense.tools``) -> library (models, block, weights, memory model) -> backends -> Triton kernels and the C++
extension; nothing imports upward and no module-level imports form a cycle. Read from the source (every import
statement, also those inside functions), not from what happens to be imported at run time."""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "effdense"

#: layer of a module, by name prefix (longest prefix wins); a module may import its own layer and those below
LAYERS = {
    "effdense._build": 0, "effdense._ext": 0, "effdense.kernels": 0,
    "effdense.backends": 1,
    "effdense": 2,                       # the library: block, models, weights, memory, cuda_graphs, build_ext
    "effdense.tools": 3,
    "effdense.info": 3, "effdense.demo": 3,        # `python -m effdense.info/.demo`: entry points of the tools
    "effdense.train": 4,
}
#: the layer-0 parts do not import each other, except the extension loader its builder
ALLOWED_SIDEWAYS = {("effdense._ext", "effdense._build")}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(name: str) -> tuple[int, str]:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix], prefix


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(module, at_module_level)`` for every effdense module ``path`` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` may name a submodule: count it as an import of that submodule where one exists
            targets = [f"{mod}.{a.name}" if (PACKAGE.parent / f"{mod}.{a.name}".replace(".", "/")).with_suffix(
                ".py").exists() or (PACKAGE.parent / f"{mod}.{a.name}".replace(".", "/") / "__init__.py").exists()
                else mod for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t == "effdense" or t.startswith("effdense.")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for mod, deps in graph().items():
        mine, my_prefix = layer(mod)
        for dep, _ in deps:
            theirs, their_prefix = layer(dep)
            sideways = mine == theirs == 0 and my_prefix != their_prefix
            if theirs > mine or (sideways and (my_prefix, their_prefix) not in ALLOWED_SIDEWAYS):
                upward.append(f"{mod} (layer {mine}) imports {dep} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_module_level_imports_have_no_cycle():
    edges = {m: sorted({d for d, top in deps if top and d != m}) for m, deps in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in edges.get(m, []):
            if d.startswith(m + "."):
                continue        # a package importing its own submodules runs them to completion first
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in edges:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_the_layers_cover_every_module():
    assert all(layer(m) for m in graph())
    assert {"effdense.train.run", "effdense.tools.info", "effdense.backends.common", "effdense.models"} <= set(graph())


def test_the_readme_code_map_names_every_folder_and_only_real_ones():
    """The README's code map (at most 20 lines) lists folders that exist, and every package folder and every
    top-level module of ``effdense`` it names exists too."""
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text.split("## Code map", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) <= 20, f"the code map has {len(lines)} lines"
    heads = [ln.split("  ")[0] for ln in lines if not ln.startswith(" ")]  # the first column: folders
    folders = {f.rstrip("/") for head in heads for f in re.findall(r"([\w/]+/)", head)}
    for folder in folders:
        assert (root / folder).is_dir(), f"the code map names {folder}/, which does not exist"
    packages = {p.parent.relative_to(root).as_posix() for p in (root / "effdense").glob("*/__init__.py")}
    assert packages <= folders, f"package folders missing from the code map: {sorted(packages - folders)}"
    named = set(re.findall(r"\b(\w+)\.py\b", block))
    missing = {n for n in named if not any((root / "effdense").rglob(f"{n}.py"))}
    assert not missing, f"the code map names modules that do not exist: {sorted(missing)}"
