"""`behaviorc lora export|push|list|remove`: behaviors as LoRA adapters, served per request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError

EXAMPLES = """\
examples:
  behaviorc lora export out/demo/.store/KEY/model cheerful-lora --base smollm2-135m
  behaviorc lora export tau.safetensors tau-lora --base base/ --energy 90%
  behaviorc lora export out/persona/compose/persona/model persona-lora --base base/ \\
      --pairs specs/data/cheerful_eval.jsonl       margins: base, + full delta, + adapter
  behaviorc serve smollm2-135m --lora               a server that takes adapters at run time
  behaviorc lora push http://127.0.0.1:8000 cheerful-lora --name cheerful
  behaviorc lora list http://127.0.0.1:8000
  behaviorc lora remove http://127.0.0.1:8000 cheerful

A request picks an adapter by naming it as its model, and may steer in the same request:
  {"model": "cheerful", "prompt": "...", "vllm_xargs": {"steer": "happy:2"}}
Requests naming the served model get no adapter.
"""


def register(subparsers: Any) -> None:
    from behaviorc.compose.lora import DEFAULT_RANK
    from behaviorc.engine.vllm.http import API_KEY_ENV

    lora = subparsers.add_parser(
        "lora", help="trained behaviors as LoRA adapters, loaded into live servers per request",
        description="Export a task vector (or a trained or composed model folder) as a PEFT "
                    "LoRA adapter, and load adapters into a live vLLM server started with "
                    "`behaviorc serve --lora`, where each request picks one by name.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = lora.add_subparsers(dest="lora_command", metavar="COMMAND")

    export = commands.add_parser(
        "export", help="a task vector or model folder as a LoRA adapter folder",
        description="Factor each changed linear weight's delta by a truncated SVD into "
                    "PEFT's adapter format (adapter_config.json, adapter_model.safetensors), "
                    "which PeftModel.from_pretrained and vLLM load. Changed embeddings, "
                    "norms, gates and convolutions cannot be carried by LoRA: they are "
                    "listed with their share of the delta's energy (squared norm).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("delta", type=Path,
                        help="a task-vector .safetensors file, or a fine-tuned or composed "
                             "model folder (its delta is taken against --base)")
    export.add_argument("out", type=Path, help="the adapter folder to write")
    export.add_argument("--base", required=True,
                        help="the base model: a built-in (smollm2-135m, ...) or a folder")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, default=None,
                        help=f"the rank of each matrix's factors (default {DEFAULT_RANK}; "
                             "a matrix of lower rank keeps its own)")
    choice.add_argument("--energy", default=None, metavar="SHARE",
                        help="instead of a rank: the fewest singular values that keep this "
                             "share of each matrix's energy, e.g. 90%% or 0.9")
    export.add_argument("--pairs", type=Path, default=None,
                        help="held-out pairs (JSONL {prompt, positive, negative}): also report "
                             "the margin of the base, base + full delta and base + adapter")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    export.set_defaults(run=run_export)

    def server_parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=description, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("url", help="a server started by `behaviorc serve --lora` (a key "
                                        f"it needs comes from ${API_KEY_ENV})")
        return parser

    push = server_parser(
        "push", "load an adapter into a live server under a name",
        "Check an adapter folder against the served model (safetensors only, a plain PEFT "
        "LoRA, every factor shaped for one of its linear layers, made for that base) and "
        "load it at run time through vLLM's /v1/load_lora_adapter: no restart, no pause. "
        "Requests naming it as their model get it; a refused adapter never reaches vLLM.")
    push.add_argument("adapter", type=Path, help="an adapter folder (`lora export` writes one)")
    push.add_argument("--name", required=True, help="the model name requests will use")
    push.add_argument("--base", type=Path, default=None,
                      help="the served model's folder, when the server's path is not readable here")
    push.set_defaults(run=run_push)

    listing = server_parser("list", "the adapters a live server has loaded",
                            "Print the served model and each loaded adapter's name and folder.")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(run=run_list)

    remove = server_parser("remove", "unload an adapter from a live server",
                           "Unload NAME through vLLM's /v1/unload_lora_adapter; new requests "
                           "naming it get a 404.")
    remove.add_argument("name", help="the adapter's name")
    remove.set_defaults(run=run_remove)
    lora.set_defaults(run=lambda args: _usage(lora))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def parse_energy(text: str) -> float:
    """`90%` or `0.9` as a share."""
    stripped = text.strip()
    try:
        value = float(stripped.removesuffix("%"))
    except ValueError:
        raise BehaviorError(f"--energy {text!r} is not a share", hint="write e.g. 90% or 0.9") from None
    return value / 100 if stripped.endswith("%") else value


def run_export(args: argparse.Namespace) -> int:
    from behaviorc.compose.lora import RankChoice, compare_margins, export_lora
    from behaviorc.engine.vllm.server import resolve_model_dir

    choice = RankChoice.given(args.rank, parse_energy(args.energy) if args.energy is not None else None)
    pairs = _read_pairs(args.pairs) if args.pairs else None
    base = resolve_model_dir(args.base)
    exported = export_lora(args.delta, base, args.out, choice, overwrite=args.overwrite)
    report: dict[str, Any] = exported.summary()
    if pairs:
        report.update(compare_margins(base, args.delta, args.out, pairs))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote {args.out}: {report['modules']} modules, {exported.choice}, ranks "
          f"{min(exported.ranks.values())}..{report['max_rank']} (mean {report['mean_rank']:.1f})")
    print(f"energy kept: {report['energy_kept']:.1%} of the delta")
    if exported.uncarried:
        print(f"not carried (LoRA adapts linear weights only): {len(exported.uncarried)} "
              f"tensors, {report['uncarried_energy']:.2%} of the energy")
        for name, share in sorted(exported.uncarried.items(), key=lambda item: -item[1])[:10]:
            print(f"  {name}  {share:.2%}")
    if pairs:
        print(f"held-out margin: base {report['margin_base']:.3f}, + full delta "
              f"{report['margin_full']:.3f}, + adapter {report['margin_adapter']:.3f} "
              f"({report['margin_kept']:.0%} of the gain)")
    return 0


def _read_pairs(path: Path) -> list[Any]:
    from behaviorc.core.textfiles import TextFileError, read_text_file
    from behaviorc.lang.data import RecordError, read_pair

    try:
        text = read_text_file(str(path), "data").text
    except TextFileError as err:
        raise BehaviorError(f"{path}: {err}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise RecordError("a line must be a JSON object")
            pairs.append(read_pair(record))
        except (ValueError, RecordError) as err:
            raise BehaviorError(f"{path}:{number}: {err}") from None
    if not pairs:
        raise BehaviorError(f"{path}: no pairs")
    return pairs


def run_push(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.lora import push_adapter

    with _client(args) as client:
        checked = push_adapter(client, args.adapter, args.name, args.base)
    print(f"{args.name}: {len(checked.ranks)} modules, rank <= {checked.max_rank}, on {args.url}")
    print(f"use it with \"model\": \"{args.name}\"")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.lora import served

    with _client(args) as client:
        now = served(client)
    if args.json:
        print(json.dumps({"model": now.model, "adapters": now.adapters}, indent=2))
        return 0
    print(f"{args.url}: serving {now.model}")
    if not now.adapters:
        print("no adapters loaded")
    for name, root in sorted(now.adapters.items()):
        print(f"{name}  {root}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.lora import remove_adapter

    with _client(args) as client:
        remove_adapter(client, args.name)
    print(f"unloaded {args.name} from {args.url}")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from behaviorc.engine.vllm.http import answering_client

    return answering_client(args.url, f"`lora {args.lora_command}`")
