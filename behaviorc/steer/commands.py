"""`behaviorc steer show` and `behaviorc steer convert`: steering files by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError

METHODS = """\
methods (a steer section's `method`), each from the paired differences d = positive - negative
of the hidden states, and each pointing from negative to positive (aligned with mean(d)):
  mean_diff   mean(d)
  pca         first principal direction of d, uncentered, scaled to mean(d) along it
  pca_diff    repeng's default: first principal component of d - mean(d) (how pairs differ
              beyond their common shift), scaled to |mean(d)|
  pca_center  repeng's: first principal component of each state minus its pair's midpoint
              (the axis of pca), scaled to |mean(d)|

"""
STRENGTH = """\
strength: a vector's length is the pairs' own contrast at its layer, so strength 1 moves a
hidden state as far as an average positive lies from its negative, on any model. A GGUF
holds the vectors as they are: llama.cpp's --control-vector-scaled FILE S steers like
strength S; repeng's unit vectors need coefficient S x the layer's norm (`steer show`).

"""
FILE_EXAMPLES = """\
examples:
  behaviorc steer show out/listen/listen/vectors.safetensors
  behaviorc steer show listen.gguf --json
  behaviorc steer convert vectors.safetensors listen.gguf     for llama.cpp --control-vector
  behaviorc steer convert repeng_vector.gguf listen.safetensors
"""
SERVER_EXAMPLES = """\
examples:
  behaviorc steer push http://127.0.0.1:8000 out/listen/listen/vectors.safetensors --name happy
  behaviorc steer list http://127.0.0.1:8000
  behaviorc steer remove http://127.0.0.1:8000 happy

A vector pushed under a name steers only the requests that ask for it, at the strength
they give (`steer --help` says what a strength is); MODEL is the id `behaviorc serve` prints:
  curl URL/v1/completions -d '{"model": "MODEL", "prompt": "...", "vllm_xargs": {"steer": "happy:2"}}'
  behaviorc chat URL --steer happy:2,concise:-1
"""
EXAMPLES = METHODS + STRENGTH + FILE_EXAMPLES + "  " + SERVER_EXAMPLES.removeprefix("examples:\n  ")

SUFFIXES = (".safetensors", ".gguf")


def register(subparsers: Any) -> None:
    steer = subparsers.add_parser(
        "steer", help="inspect and convert steering files; push them to live servers",
        description="Steering vectors are one direction per decoder layer (numbered from 0; "
                    "the vector for layer L is added at the output of layer L). Builds write "
                    "them as safetensors (`layer.L` tensors) and as GGUF control vectors "
                    "(`direction.L`, the format llama.cpp and repeng read).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = steer.add_subparsers(dest="steer_command", metavar="COMMAND")
    steer.set_defaults(run=lambda args: _usage(steer))

    show = commands.add_parser(
        "show", help="layers, norms and provenance of a steering file",
        description="Print a steering file's layers with their norms and its metadata.",
        epilog=STRENGTH + FILE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("path", type=Path, help="a .safetensors or .gguf steering file")
    show.add_argument("--json", action="store_true", help="print the metadata as JSON")
    show.set_defaults(run=run_show)

    convert = commands.add_parser(
        "convert", help="between safetensors and GGUF control vectors",
        description="Read a steering file and write it in the format OUT's suffix names. "
                    "GGUF cannot hold layer 0 (llama.cpp refuses it): leave it out with "
                    "--layers.",
        epilog=STRENGTH + FILE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", type=Path, help="a .safetensors or .gguf steering file")
    convert.add_argument("out", type=Path, help="the .safetensors or .gguf file to write")
    convert.add_argument("--layers", default="", help="comma-separated layers to keep (default: all)")
    convert.set_defaults(run=run_convert)
    _register_server_commands(commands)


def _register_server_commands(commands: Any) -> None:
    """`steer push|list|remove`: the named vectors a live server steers requests with."""
    from behaviorc.engine.vllm.server import API_KEY_ENV

    def server_parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=description, epilog=SERVER_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("url", help="a server started by `behaviorc serve` (a key it needs "
                                        f"comes from ${API_KEY_ENV}, never the command line)")
        return parser

    push = server_parser(
        "push", "register a steering file on a live server under a name",
        "Send a steering file's vectors to a live vLLM server under NAME. The server "
        "checks every layer (in range, one value per hidden unit, finite) before it "
        "changes anything; a name already registered is replaced, and the next forward "
        "pass uses the new vector. Requests choose it with "
        "\"vllm_xargs\": {\"steer\": \"NAME:STRENGTH\"}; nothing else is steered. It steers "
        "the positions the file says (`steer show`: its behavior's `steer { positions }`; "
        "`generated`: only the tokens that choose the reply).")
    push.add_argument("path", type=Path, help="a .safetensors or .gguf steering file")
    push.add_argument("--name", required=True, help="the name requests will use, e.g. happy")
    push.add_argument("--layers", default="", help="comma-separated layers to send (default: all)")
    push.set_defaults(run=run_push)

    listing = server_parser("list", "the named vectors a live server holds",
                            "Print each registered vector's name, layers, norms and digest.")
    listing.add_argument("--json", action="store_true", help="print the registry as JSON")
    listing.set_defaults(run=run_list)

    remove = server_parser("remove", "remove a named vector from a live server",
                           "Remove NAME from the server's registry. Requests already "
                           "running with it go on without it; new ones naming it get a 400.")
    remove.add_argument("name", help="the registered name")
    remove.set_defaults(run=run_remove)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def read_any(path: Path):
    from behaviorc.formats.steering import load_steering, read_gguf

    return read_gguf(path) if _suffix(path) == ".gguf" else load_steering(path)


def _suffix(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise BehaviorError(f"`{path}`: expected a .safetensors or .gguf file")
    return path.suffix


def run_show(args: argparse.Namespace) -> int:
    from behaviorc.formats.steering import steering_metadata

    vectors = read_any(args.path)
    if args.json:
        print(json.dumps(steering_metadata(vectors), indent=2))
        return 0
    print(f"{args.path}: {len(vectors.layers)} layer(s), hidden size {vectors.hidden_size}")
    print(f"  method {vectors.method}, read {vectors.read}, positions {vectors.positions}, "
          f"model {vectors.model or '?'}"
          + (f" ({vectors.model_type})" if vectors.model_type else ""))
    if vectors.provenance:
        print(f"  made by {vectors.provenance}")
    for layer, norm in vectors.norms.items():
        print(f"  layer {layer:3d}  norm {norm:.6g}")
    return 0


def _selected(vectors: Any, layers: str) -> Any:
    if not layers:
        return vectors
    try:
        chosen = [int(part) for part in layers.split(",")]
    except ValueError:
        raise BehaviorError(f"--layers `{layers}` is not a comma-separated list of numbers") from None
    return vectors.select(chosen)


def run_convert(args: argparse.Namespace) -> int:
    import sys

    from behaviorc.formats.steering import GGUF_POSITIONS_NOTE, export_gguf, save_steering

    target = _suffix(args.out)
    vectors = _selected(read_any(args.source), args.layers)
    (export_gguf if target == ".gguf" else save_steering)(vectors, args.out)
    print(f"wrote {args.out}: layers {', '.join(map(str, vectors.layers))}, "
          f"positions {vectors.positions}")
    if target == ".gguf" and vectors.positions != "all":
        print(GGUF_POSITIONS_NOTE, file=sys.stderr)
    return 0


def run_push(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.named_vectors import register_vectors

    vectors = _selected(read_any(args.path), args.layers)
    with _client(args) as client:
        answer = register_vectors(client, args.name, vectors.directions, vectors.positions)
    print(f"{args.name}: layers {', '.join(map(str, answer['layers']))}, positions "
          f"{vectors.positions} on {args.url} (digest {answer['digest']})")
    print(f"steer a request with \"vllm_xargs\": {{\"steer\": \"{args.name}:1\"}}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.named_vectors import registered_vectors

    with _client(args) as client:
        registry = registered_vectors(client)
    if args.json:
        print(json.dumps(registry, indent=2))
        return 0
    if not registry:
        print(f"{args.url}: no named steering vectors")
    for name, entry in sorted(registry.items()):
        norms = ", ".join(f"{layer}: {norm:.4g}" for layer, norm in entry["norms"].items())
        print(f"{name}  layers {', '.join(map(str, entry['layers']))}  norms {{{norms}}}  "
              f"positions {entry.get('positions', 'all')}  digest {entry['digest']}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.named_vectors import unregister_vector

    with _client(args) as client:
        unregister_vector(client, args.name)
    print(f"removed {args.name} from {args.url}")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from behaviorc.engine.vllm.http import answering_client

    return answering_client(args.url, f"`steer {args.steer_command}`")
