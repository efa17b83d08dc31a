"""The bundled ``toy-ioi-deep`` model: loads offline, solves IOI on held-out data, and has
the IOI circuit classes its model card names (and lacks the ones it says it lacks).

Every class is measured afresh here on held-out prompts. The figures that decide a class are
recomputed with code written in this file where that is short (attention from the cache,
copy scores from the Hugging Face weights, accuracy from raw logits), so the test does not
rest on :mod:`patchwidgets.ioi_circuit` alone; the path-patching figures come from
``pw.path_patch``, which ``test_path_patching.py`` checks against a slow reference, and from
the hook-written ``direct_effects_ablated``, which must agree with it exactly.
The thresholds are those of :mod:`patchwidgets.ioi_circuit`, fixed before any model was
trained; every deciding figure clears its threshold by a margin that float differences
between CPUs (about 1e-6 here) cannot close.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must precede any Hugging Face import

import json

import pytest
import torch

from patchwidgets import datasets, ioi_circuit
from patchwidgets.loading import list_models, load_model, model_path

NAME = "toy-ioi-deep"
NAMES = [" " + name for name in datasets.NAMES]


@pytest.fixture(scope="module")
def model():
    return load_model(NAME, device="cpu")


@pytest.fixture(scope="module")
def items():
    return datasets.ioi_prompts(60, split="test", seed=7)  # (the card: 200; each figure has room)


@pytest.fixture(scope="module")
def card():
    return json.loads((model_path(NAME) / "circuit.json").read_text())


@pytest.fixture(scope="module")
def means(model, items):
    return ioi_circuit.abc_means(model, items)  # [n, pos, layer, head, d_head]: per-template ABC means


@pytest.fixture(scope="module")
def circuit(model, items):
    return ioi_circuit.find_circuit(model, items, NAMES)


def heads(names):
    return [tuple(int(x) for x in name.split(".")) for name in names]


def test_bundled_offline_and_small():
    assert NAME in list_models()
    path = model_path(NAME)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 6 and config["n_head"] == 8
    assert (path / "model.safetensors").stat().st_size < 25e6
    assert (path / "MODEL_CARD.md").is_file()


@torch.no_grad()
def test_held_out_accuracy(model):
    items = datasets.ioi_prompts(400, split="test", seed=123)
    r = ioi_circuit.roles(model, items)
    rows = torch.arange(r.n)
    logits = model(r.tokens)[rows, r.end].float()
    accuracy = (logits.argmax(-1) == r.io_id).float().mean().item()
    logit_diff = (logits[rows, r.io_id] - logits[rows, r.s_id]).mean().item()
    assert accuracy >= 0.99, accuracy
    assert logit_diff >= 5.0, logit_diff


def test_classes_match_the_card(circuit, card):
    """The classes found now are exactly those the model card names (today: none of Wang et
    al.'s classes; seven heads that move the logit difference by at least 5% and fit none)."""
    found = {
        "name_movers": circuit.name_movers, "negative_name_movers": circuit.negative_name_movers,
        "s_inhibition": circuit.s_inhibition, "duplicate_token": circuit.duplicate_token,
        "induction": circuit.induction, "backup": circuit.backup,
        "unclassified": circuit.unclassified,
    }
    assert {k: sorted(v) for k, v in found.items()} == {k: sorted(heads(v)) for k, v in card["classes"].items()}


#: The card's reading of the circuit (attempt 5).
IO_HEADS = [(3, 5), (3, 6), (3, 7)]      # attend END -> IO in both orders, copy weakly
POSITIONAL = {(3, 3): "first", (3, 4): "second"}  # attend END -> the first / second name
S2_READERS = [(1, 6), (2, 5)]            # attend END -> S2, steer the IO heads' queries


@torch.no_grad()
def test_where_end_looks(model, items):
    """From the cache, by name order (ABBA: the IO is the first name; BABA: S1 is): 3.5-3.7
    attend the IO in both orders, 3.3 the first name and 3.4 the second whichever is the IO,
    1.6 and 2.5 attend S2."""
    def end_to(order, role, layer, head):
        chosen = [it for it in items if it["order"] == order]
        r = ioi_circuit.roles(model, chosen)
        _, cache = model.run_with_cache(r.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        rows = torch.arange(r.n)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][rows, head, r.end]  # [n, key_pos]
        return pattern[rows, getattr(r, role)].mean().item()

    for head in IO_HEADS:  # (lowest measured: 3.7 on ABBA, 0.58)
        assert end_to("ABBA", "io", *head) > 0.5 and end_to("BABA", "io", *head) > 0.5, head
    first, second = {"ABBA": "io", "BABA": "s1"}, {"ABBA": "s1", "BABA": "io"}
    for head, which in POSITIONAL.items():
        for order in ("ABBA", "BABA"):
            role = (first if which == "first" else second)[order]
            assert end_to(order, role, *head) > 0.9, (head, order)
    for head in S2_READERS:
        assert end_to("ABBA", "s2", *head) > 0.75 and end_to("BABA", "s2", *head) > 0.75, head


@torch.no_grad()
def test_copy_scores_from_the_weights(card, model):
    """Copy scores written out on the Hugging Face weights: the positional heads copy (>= 0.8);
    the heads that find the IO do not (below 0.5, far from the definition's 0.8), as the card
    says: they are not name movers. The same verdict under Wang et al.'s own counting (the name
    among the 5 largest logits of the whole vocabulary): the IO heads reach about 0.6."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path = model_path(NAME)
    hf = GPT2LMHeadModel.from_pretrained(str(path)).float().eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = torch.tensor([tok(n, add_special_tokens=False)["input_ids"][0] for n in NAMES])
    blocks, n_heads, width = hf.transformer.h, hf.config.n_head, hf.config.n_embd
    d_head = width // n_heads
    embed = hf.transformer.wte.weight[ids]
    resid = embed + blocks[0].mlp(blocks[0].ln_2(embed))

    def ov_logits(layer, head, unembed):
        x = blocks[layer].ln_1(resid)
        cols = slice(2 * width + head * d_head, 2 * width + (head + 1) * d_head)
        v = x @ blocks[layer].attn.c_attn.weight[:, cols] + blocks[layer].attn.c_attn.bias[cols]
        out = v @ blocks[layer].attn.c_proj.weight[head * d_head:(head + 1) * d_head]
        return hf.transformer.ln_f(out) @ unembed.T  # [names, names or vocab]

    def copy_score(layer, head):
        logits = ov_logits(layer, head, hf.transformer.wte.weight[ids])
        return (logits.argmax(-1) == torch.arange(len(ids))).float().mean().item()

    def wang_copy_score(layer, head):
        top5 = ov_logits(layer, head, hf.transformer.wte.weight).topk(5, -1).indices  # [names, 5] token ids
        return (top5 == ids[:, None]).any(-1).float().mean().item()

    scores = {h: copy_score(*h) for h in [*POSITIONAL, *IO_HEADS]}
    assert all(scores[h] >= 0.9 for h in POSITIONAL), scores
    assert all(0.2 < scores[h] < 0.5 for h in IO_HEADS), scores
    recorded = {row["head"]: row["copy"] for row in card["heads"]["unclassified"]}
    for (layer, head), score in scores.items():
        assert abs(score - recorded[f"{layer}.{head}"]) < 1e-3

    wang = {h: wang_copy_score(*h) for h in [*POSITIONAL, *IO_HEADS]}
    assert all(wang[h] >= 0.9 for h in POSITIONAL), wang
    assert all(0.5 < wang[h] < 0.7 for h in IO_HEADS), wang  # the card: 0.60-0.62, far from 0.8 still
    library = ioi_circuit.copy_scores(model, NAMES, top=5, whole_vocab=True)
    for head, score in wang.items():
        assert abs(float(library[head]) - score) < 1e-3, (head, float(library[head]), score)


def test_direct_effects_two_ways(model, items):
    """The engine's path patching and the hook-written version agree exactly."""
    few = items[:12]
    engine = ioi_circuit.direct_effects(model, few)
    by_hand = ioi_circuit.direct_effects_ablated(model, few)
    assert torch.allclose(engine, by_hand, atol=1e-4), (engine - by_hand).abs().max()


def test_layer_3_works_through_the_mlps(model, items, circuit):
    """With MLPs 3-5 frozen as well (only the residual path to the logits), the positional
    copiers keep under a fifth of their direct effect and the IO heads under half: the later MLPs
    turn what layer 3 writes into the answer (the card's reading of the weak copy scores)."""
    frozen = ioi_circuit.direct_effects(model, items, freeze_mlps=True)
    recomputed = circuit.measurements["direct"]
    for head in POSITIONAL:
        assert frozen[head] < 0.2 * recomputed[head], (head, frozen[head], recomputed[head])
    for head in IO_HEADS:
        assert 0 < frozen[head] < 0.5 * recomputed[head], (head, frozen[head], recomputed[head])


def test_s2_readers_steer_the_io_heads_queries(circuit):
    """Path patching (ABC, noising) from 1.6 and 2.5 into the queries of 3.5-3.7 moves the
    logit difference by more than 5% each (the S-inhibition test; measured 10% and 13%), while
    their own direct effects are small: without them the circuit would have a hole."""
    m, ld = circuit.measurements, circuit.logit_diff
    for head in S2_READERS:
        assert m["into_io_attenders_q"][head] >= 0.07 * ld, (head, m["into_io_attenders_q"][head])
        assert m["direct"][head] < ioi_circuit.NAME_MOVER_EFFECT * ld
    assert sorted(h for h in circuit.unclassified if h[0] < 3) == S2_READERS


def test_no_head_takes_over(model, items, circuit, means):
    """Mean-ablate the three IO heads (ABC mean): they carried most of the logit difference,
    the model keeps under half of it, and no other head's direct effect rises by even half of
    the 20% of the loss that a backup head needs (the largest, 2.5's, by about 8%)."""
    before = circuit.measurements["direct"]
    after = ioi_circuit.direct_effects_ablated(model, items, IO_HEADS, means)
    lost = float(sum(before[h] - after[h] for h in IO_HEADS))
    assert lost > 0.75 * circuit.logit_diff
    rise = after - before
    for head in IO_HEADS:
        rise[head] = 0.0
    assert float(rise.max()) < 0.5 * ioi_circuit.BACKUP_RISE * lost, float(rise.max())
    kept = float(ioi_circuit.logit_diff(model, items, IO_HEADS, means).mean())
    assert kept < 0.5 * circuit.logit_diff, kept


def test_io_heads_make_up_for_the_positional_pair(model, items, circuit, means):
    """Mean-ablate 3.3 and 3.4: the logit difference falls by well under half of the direct
    effect removed, and each IO head's direct effect rises by over a tenth of it (same layer, so
    through how the later MLPs read them; the card says why that is not backup)."""
    before = circuit.measurements["direct"]
    after = ioi_circuit.direct_effects_ablated(model, items, list(POSITIONAL), means)
    lost = float(sum(before[h] - after[h] for h in POSITIONAL))
    fall = circuit.logit_diff - float(ioi_circuit.logit_diff(model, items, list(POSITIONAL), means).mean())
    assert 0 < fall < 0.5 * lost, (fall, lost)
    for head in IO_HEADS:
        assert after[head] - before[head] > 0.1 * lost, (head, after[head], before[head])


def test_faithfulness(model, items, circuit, card, means):
    """The circuit's heads alone (every other head mean-ablated over ABC prompts of the same
    template) keep at least 80% of the logit difference; none of them keep almost nothing;
    the five layer-3 heads without the two that steer them keep much less."""
    kept = ioi_circuit.faithfulness(model, items, circuit.heads, means)
    assert kept >= 0.8, kept
    assert abs(ioi_circuit.faithfulness(model, items, [], means)) < 0.2
    assert abs(kept - card["faithfulness"]) < 0.1  # the card's figure, on its own 200 prompts
    layer_3 = [h for h in circuit.heads if h[0] == 3]
    assert ioi_circuit.faithfulness(model, items, layer_3, means) < 0.5


def test_training_script_smoke(tmp_path):
    """The recipe runs, and its vocabulary (rebuilt from code) is the shipped one: otherwise
    the checkpoint no longer fits ``patchwidgets.deep_world``."""
    import importlib.util
    from pathlib import Path

    script_path = Path(__file__).resolve().parents[1] / "scripts" / "train_toy_ioi_deep.py"
    spec = importlib.util.spec_from_file_location("train_toy_ioi_deep", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        results = script.main(["--steps", "2", "--out", str(tmp_path), "--eval-prompts", "8", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    bundled = json.loads((model_path(NAME) / "tokenizer.json").read_text())
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == bundled["model"]["vocab"]
    assert results["training"]["parameters"] == 4_878_336
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n_positions"] == 128 and config["dtype"] == "float16"


# ------------------------------------------------------------------ the corpus and its asides
#: sha256 of the shipped model's first 3,000 documents and of its coverage sentences. The
#: weights were trained by an experiment's own copy of the corpus code (attempt 5); its output
#: hashed to these same values, and a rerun of ``scripts/train_toy_ioi_deep.py`` rebuilt the
#: weights. A change to ``deep_world`` must not change the recipe of the checkpoint in the package.
SHIPPED_CORPUS = "85f038b73cba8a2b966b1be7bf8518377096c45332c141e5c57d8e9caf538a2d"
SHIPPED_COVERAGE = "8ca9fa1de09c5e5d0691db92e319b503cd8542692b307d9a8513355e206cdc6f"


def _sha(lines):
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_shipped_corpus_is_unchanged():
    from patchwidgets import deep_world

    assert _sha(deep_world.training_documents(3000, seed=0, aside=0.4)) == SHIPPED_CORPUS
    assert _sha(deep_world.coverage_sentences(asides=True)) == SHIPPED_COVERAGE


def test_asides_name_a_third_person_after_s2():
    """``aside=0.4`` (the shipped model; the card's attempts 4 and 5): about 0.4 of the IOI documents (0.45 of all)
    get an aside right after S2, naming someone who is not S; S2 repeats a name said before."""
    import re

    from patchwidgets import deep_world

    openings = [aside.split("{NAME}")[0] for aside in deep_world.ASIDES]
    docs = deep_world.training_documents(3000, seed=0, aside=0.4)
    with_aside = [doc for doc in docs if any(o in doc for o in openings)]
    assert 0.14 < len(with_aside) / len(docs) < 0.22  # 0.45 x 0.4 = 0.18
    for doc in with_aside:
        s2, third = re.search(r" (\w+)(?:, who had seen|, tired after talking to|, after a call from) (\w+),",
                              doc).groups()
        assert s2 != third and s2 in NAMES_SET and third in NAMES_SET
        assert len(re.findall(rf"\b{s2}\b", doc)) >= 2, doc  # S was said before S2
    assert not any(o in doc for doc in deep_world.training_documents(3000, seed=0) for o in openings)


NAMES_SET = set(datasets.NAMES)
