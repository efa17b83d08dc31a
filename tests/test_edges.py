"""Circuit discovery by edges: the graph, EAP / EAP-IG scores, exact edge patching, faithfulness.

Every expected value comes from somewhere else than the code under test:

* edge counts from the formula in :mod:`patchwidgets.edges` and a brute-force count over every
  pair of nodes, and GPT-2 small's 32,491 from the EAP-IG paper;
* EAP and EAP-IG scores from :func:`reference_scores`, the formula written out with plain
  TransformerLens hooks and no forks: each receiver's input gradient is taken through its own
  projection (``hook_q`` of one head, ``ln2``'s output, the final residual stream) and carried
  back through its LayerNorm by hand;
* exact edge patches from :func:`reference_patch`, a plain forward pass whose hooks rebuild each
  patched head's query, key or value from ``ln1(x + Δ) @ W + b``, add ``Δ`` before ``ln2`` and
  to the final residual stream, with ``Δ`` from the senders' outputs in the same pass;
* head -> logits edges from :func:`patchwidgets.path_patch`, and the two ends of faithfulness
  from the unpatched runs.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch

import patchwidgets as pw
from patchwidgets.edge_patching import edge_patches
from patchwidgets.edges import Edge, Graph
from patchwidgets.errors import DegenerateNormalizationError, IdenticalPromptsError, PatchingInputError

N_LAYERS, N_HEADS, VOCAB, BATCH, SEQ, CHANGED = 2, 4, 64, 3, 7, 3


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def model(make_random_bridge):
    """A 2-layer random GPT-2 with large weights (logit differences of order 1)."""
    return make_random_bridge(n_layers=N_LAYERS, n_heads=N_HEADS, vocab=VOCAB, initializer_range=0.2)


@pytest.fixture(scope="session")
def data():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    corrupted = clean.clone()
    corrupted[:, CHANGED] = (clean[:, CHANGED] + torch.randint(1, VOCAB - 2, (BATCH,), generator=g)) % VOCAB
    corrupted[0, CHANGED + 2] = (clean[0, CHANGED + 2] + 1) % VOCAB   # one pair differs twice
    answers = [(5, 6), (7, 9), (10, 11)]
    return clean, corrupted, answers


@pytest.fixture(scope="session")
def toy_ioi(toy_model):
    from patchwidgets.datasets import ioi_prompts

    prompts = ioi_prompts(12, split="test")
    return toy_model, [p["clean"] for p in prompts], [p["corrupted"] for p in prompts], \
        [(p["correct"], p["incorrect"]) for p in prompts]


def _metric(name, answers):
    c = torch.tensor([a for a, _ in answers])
    i = torch.tensor([b for _, b in answers])
    rows = torch.arange(len(answers))

    def metric(logits):  # [batch, pos, vocab] -> [batch]
        last = logits[rows, -1]
        if name == "logit_diff":
            return last[rows, c] - last[rows, i]
        return last.log_softmax(-1)[rows, c]
    return metric


def _outputs(model, cache):
    """``[batch, pos, senders, d_model]``: input, then per layer each head's z @ W_O and the MLP."""
    outs = [cache["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(model.cfg.n_layers):
        w_o = model.blocks[layer].attn.W_O.detach()
        outs.append(torch.einsum("bphe,hed->bphd", cache[f"blocks.{layer}.attn.hook_z"], w_o))
        outs.append(cache[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    return torch.cat(outs, 2)


def _vjp(fn, x, grad_out):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(fn(x), x, grad_out)[0]


# ---------------------------------------------------------------------------- references
def reference_scores(model, target, source, answers, metric="logit_diff", alpha=1.0):
    """EAP scores, edge by edge, of patching ``source`` values into the ``target`` run, with
    the gradient taken where the embeddings are ``e_S + alpha (e_T - e_S)`` (EAP: alpha 1)."""
    n = model.cfg.n_layers
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source)
        _, target_cache = model.run_with_cache(target)
    delta = _outputs(model, source_cache) - _outputs(model, target_cache)
    e_s, e_t = source_cache["blocks.0.hook_resid_pre"], target_cache["blocks.0.hook_resid_pre"]
    saved = {}

    def keep(name):
        def hook(act, hook):
            saved[name] = act
            return act
        return hook

    def interpolate(act, hook):
        return (e_s + alpha * (e_t - e_s)).requires_grad_(True)

    grads_of = [f"blocks.{l}.{h}" for l in range(n) for h in ("attn.hook_q", "attn.hook_k", "attn.hook_v",
                                                               "ln2.hook_out")] + [f"blocks.{n - 1}.hook_resid_post"]
    streams = [f"blocks.{l}.hook_resid_{r}" for l in range(n) for r in ("pre", "mid")]
    logits = model.run_with_hooks(target, fwd_hooks=[("blocks.0.hook_resid_pre", interpolate),
                                                     *[(name, keep(name)) for name in grads_of + streams]])
    value = _metric(metric, answers)(logits).sum()
    grads = dict(zip(grads_of, torch.autograd.grad(value, [saved[name] for name in grads_of])))
    graph = Graph.from_model(model)
    scores = torch.zeros(graph.n_edges)
    for index, edge in enumerate(graph.edges):
        node = graph.node(edge.receiver)
        if node.kind == "head":
            attn, layer = model.blocks[node.layer].attn, node.layer
            w = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[edge.input][node.head].detach()
            ln = model.blocks[layer].ln1.original_component
            g = _vjp(lambda x, ln=ln, w=w: ln(x) @ w, saved[f"blocks.{layer}.hook_resid_pre"],
                     grads[f"blocks.{layer}.attn.hook_{edge.input}"][:, :, node.head])
        elif node.kind == "mlp":
            ln = model.blocks[node.layer].ln2.original_component
            g = _vjp(ln, saved[f"blocks.{node.layer}.hook_resid_mid"], grads[f"blocks.{node.layer}.ln2.hook_out"])
        else:
            g = grads[f"blocks.{n - 1}.hook_resid_post"]
        scores[index] = (delta[:, :, graph.sender_index(edge.sender)] * g).sum() / len(answers)
    return scores


def reference_patch(model, target, source, answers, edges):
    """The mean logit difference of the ``target`` run with ``edges`` carrying ``source``
    values, from one plain forward pass (no forks, no resuming)."""
    graph = Graph.from_model(model)
    n, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source)
    src = _outputs(model, source_cache)
    now = {}          # sender index -> its output in this pass
    stream = {}

    def delta(receiver, inp):
        total = 0
        for edge in edges:
            if (edge.receiver, edge.input) == (receiver, inp):
                u = graph.sender_index(edge.sender)
                total = total + src[:, :, u] - now[u]
        return total

    def record_input(act, hook):
        now[0] = act.clone()

    def record_heads(layer):
        def hook(z, hook):
            out = torch.einsum("bphe,hed->bphd", z, model.blocks[layer].attn.W_O)
            for h in range(n_heads):
                now[graph.sender_index(f"a{layer}.h{h}")] = out[:, :, h]
        return hook

    def record_mlp(layer):
        def hook(out, hook):
            now[graph.sender_index(f"m{layer}")] = out.clone()
        return hook

    def keep_stream(layer):
        def hook(act, hook):
            stream[layer] = act.clone()
        return hook

    def rebuild(layer, inp):
        attn = model.blocks[layer].attn
        w, b = {"q": (attn.W_Q, attn.b_Q), "k": (attn.W_K, attn.b_K), "v": (attn.W_V, attn.b_V)}[inp]
        ln = model.blocks[layer].ln1.original_component

        def hook(act, hook):
            assert float((ln(stream[layer]) @ w[0] + b[0] - act[:, :, 0]).abs().max()) < 1e-4  # what hook_q is
            act = act.clone()
            for h in range(n_heads):
                d = delta(f"a{layer}.h{h}", inp)
                if torch.is_tensor(d):
                    act[:, :, h] = ln(stream[layer] + d) @ w[h] + b[h]
            return act
        return hook

    def add(receiver):
        def hook(act, hook):
            d = delta(receiver, "in")
            return act + d if torch.is_tensor(d) else act
        return hook

    hooks = [("blocks.0.hook_resid_pre", record_input)]
    for layer in range(n):
        hooks += [(f"blocks.{layer}.hook_resid_pre", keep_stream(layer)),
                  *[(f"blocks.{layer}.attn.hook_{c}", rebuild(layer, c)) for c in "qkv"],
                  (f"blocks.{layer}.attn.hook_z", record_heads(layer)),
                  (f"blocks.{layer}.ln2.hook_in", add(f"m{layer}")),
                  (f"blocks.{layer}.hook_mlp_out", record_mlp(layer))]
    hooks.append((f"blocks.{n - 1}.hook_resid_post", add("logits")))
    with torch.no_grad():
        logits = model.run_with_hooks(target, fwd_hooks=hooks)
    return float(_metric("logit_diff", answers)(logits).mean())


# ---------------------------------------------------------------------------- 1. the graph
def _formula(n_layers, n_heads, n_kv, qkv=True, parallel=False):
    senders = [1 + layer * (n_heads + 1) for layer in range(n_layers)]
    heads = sum((n_heads + 2 * n_kv if qkv else n_heads) * s for s in senders)
    mlps = sum(s + (0 if parallel else n_heads) for s in senders)
    return heads + mlps + 1 + n_layers * (n_heads + 1)


def _brute_force(n_layers, n_heads, n_kv, qkv=True, parallel=False):
    """Every (sender, receiver input) pair where the sender writes before the receiver reads."""
    # (position in the order of computation: input -1; layer L's heads 2L, its MLP 2L + 1, or
    # 2L for both with parallel attention and MLP; the logits last)
    senders = [-1] + [2 * l for l in range(n_layers) for _ in range(n_heads)] + \
        [2 * l + (0 if parallel else 1) for l in range(n_layers)]
    receivers = []
    for l in range(n_layers):
        receivers += [2 * l] * ((n_heads + 2 * n_kv) if qkv else n_heads)
        receivers.append(2 * l + (0 if parallel else 1))
    receivers.append(2 * n_layers)
    return sum(1 for s in senders for r in receivers if s < r)


@pytest.mark.parametrize("shape", [(12, 12, 12), (2, 4, 4), (4, 8, 8), (3, 8, 2), (2, 4, 1), (32, 32, 8)])
@pytest.mark.parametrize("qkv", [True, False])
def test_edge_count(shape, qkv):
    n_layers, n_heads, n_kv = shape
    if not qkv and n_kv != n_heads:
        with pytest.raises(PatchingInputError, match="shares keys and values"):
            Graph.from_config(n_layers, n_heads, n_kv, qkv=qkv)
        return
    graph = Graph.from_config(n_layers, n_heads, n_kv, qkv=qkv)
    assert graph.n_edges == len(graph.edges) == _formula(n_layers, n_heads, n_kv, qkv) \
        == _brute_force(n_layers, n_heads, n_kv, qkv)
    assert len({e.name for e in graph.edges}) == graph.n_edges
    assert [graph.index(e) for e in graph.edges[::97]] == list(range(0, graph.n_edges, 97))
    kv_nodes = [n for n in graph.nodes if n.kind == "kv_head"]
    assert len(kv_nodes) == (0 if n_kv == n_heads else n_layers * n_kv)


def test_gpt2_small_has_the_papers_edge_count():
    """32,491 edges with q/k/v separate: Hanna et al. (2024), "Have Faith in Faithfulness"."""
    from transformers import GPT2Config

    hf = GPT2Config()   # GPT-2 small's shape; no weights
    graph = Graph.from_config(hf.n_layer, hf.n_head)
    assert graph.n_edges == 32491
    assert Graph.from_config(hf.n_layer, hf.n_head, qkv=False).n_edges == 11611
    assert len(graph.senders) == 157 and len(graph.slots) == 445
    # Parallel attention and MLP (GPT-J, NeoX): no edges from a layer's heads to its MLP.
    assert Graph.from_config(12, 12, parallel_attn_mlp=True).n_edges == 32491 - 12 * 12
    assert _brute_force(12, 12, 12, parallel=True) == 32491 - 12 * 12


def test_graph_of_a_model_and_edge_names(model):
    graph = Graph.from_model(model)
    assert graph.n_edges == _formula(N_LAYERS, N_HEADS, N_HEADS) == 110
    assert [e.name for e in graph.edges[:2]] == ["input->a0.h0<q>", "input->a0.h1<q>"]
    assert graph.edges[-1].name == "m1->logits"
    edge = Edge.parse("a0.h1->a1.h3<k>")
    assert (edge.sender, edge.receiver, edge.input) == ("a0.h1", "a1.h3", "k") and edge.name == "a0.h1->a1.h3<k>"
    assert Edge.parse("a0.h2->m0<in>") == Edge.parse("a0.h2->m0") == Edge("a0.h2", "m0", "in")
    assert graph.edges[graph.index("a0.h2->m0")] == Edge("a0.h2", "m0", "in")
    gqa = Graph.from_config(2, 4, 2)
    assert gqa.edges[gqa.index("a0.h1->a1.kv1<v>")].receiver == "a1.kv1"
    with pytest.raises(PatchingInputError, match="no input 'k'"):
        gqa.index("a0.h1->a1.h1<k>")   # (keys belong to the key-value heads)


# ---------------------------------------------------------------------------- 2. EAP and EAP-IG
@pytest.mark.parametrize("direction,metric,batch_size", [("denoising", "logit_diff", None),
                                                         ("noising", "logit_diff", 2),
                                                         ("denoising", "logprob", 1)])
def test_eap_equals_the_formula(model, data, direction, metric, batch_size):
    clean, corrupted, answers = data
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    expected = reference_scores(model, target, source, answers, metric)
    got = pw.edge_attribution(model, clean, corrupted, answers, method="eap", direction=direction, metric=metric,
                              batch_size=batch_size, progress=False)
    assert got.scores.shape == (got.graph.n_edges,) and got.method == "eap" and got.direction == direction
    assert float(expected.abs().max()) > 0.1
    assert float((got.scores - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_eap_ig_equals_the_path_average(model, data):
    clean, corrupted, answers = data
    steps = 3
    expected = sum(reference_scores(model, corrupted, clean, answers, alpha=k / steps)
                   for k in range(1, steps + 1)) / steps
    got = pw.edge_attribution(model, clean, corrupted, answers, method="eap-ig", steps=steps, progress=False)
    eap = pw.edge_attribution(model, clean, corrupted, answers, method="eap", progress=False)
    assert float((got.scores - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert float((got.scores - eap.scores).abs().max()) > 1e-2   # (the path matters on this model)
    one = pw.edge_attribution(model, clean, corrupted, answers, method="eap-ig", steps=1, progress=False)
    assert torch.equal(one.scores, eap.scores)


def test_one_input_per_head_and_normalized(model, data):
    clean, corrupted, answers = data
    qkv = pw.edge_attribution(model, clean, corrupted, answers, progress=False)
    one = pw.edge_attribution(model, clean, corrupted, answers, qkv=False, progress=False)
    assert one.graph.n_edges == _formula(N_LAYERS, N_HEADS, N_HEADS, qkv=False)
    for i, edge in enumerate(one.graph.edges):
        if edge.receiver.startswith("a"):
            want = sum(float(qkv.scores[qkv.graph.index(Edge(edge.sender, edge.receiver, c))]) for c in "qkv")
        else:
            want = float(qkv.scores[qkv.graph.index(edge)])
        assert abs(float(one.scores[i]) - want) <= 1e-5
    normalized = pw.edge_attribution(model, clean, corrupted, answers, metric="normalized", progress=False)
    with torch.no_grad():
        ld = _metric("logit_diff", answers)
        gap = float((ld(model(clean)) - ld(model(corrupted))).mean())
    assert torch.allclose(normalized.scores, qkv.scores / gap, atol=1e-6)


def test_scores_frame_and_top(model, data):
    clean, corrupted, answers = data
    scores = pw.edge_attribution(model, clean, corrupted, answers, progress=False)
    frame = scores.frame()
    assert list(frame.columns[:4]) == ["sender", "receiver", "input", "score"] and len(frame) == 110
    assert (frame.score.abs().diff().dropna() <= 0).all()
    top = scores.top(5)
    assert [e.name for e in top] == list(frame.edge[:5])
    assert int(scores.mask(5).sum()) == 5 and bool(scores.mask(5)[scores.graph.index(top[0])])
    assert "eap" in repr(scores)


# ---------------------------------------------------------------------------- 3. exact edge patching
def test_edge_patching_equals_the_plain_reference(model, data):
    clean, corrupted, answers = data
    graph = Graph.from_model(model)
    g = torch.Generator().manual_seed(3)
    chosen = [graph.edges[i] for i in torch.randperm(graph.n_edges, generator=g)[:25].tolist()]
    assert {e.input for e in chosen} >= {"q", "k", "v", "in"}
    for direction in ("denoising", "noising"):
        target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
        want = reference_patch(model, target, source, answers, chosen)
        got = pw.edge_patch(model, clean, corrupted, answers, edges=chosen, direction=direction)
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (direction, got, want)
        rest = [e for e in graph.edges if e not in chosen]
        want = reference_patch(model, target, source, answers, rest)
        got = pw.edge_patch(model, clean, corrupted, answers, edges=chosen, direction=direction, complement=True)
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (direction, "complement", got, want)
    # several edge sets share passes, with the values of separate calls
    sets = [chosen[:1], chosen[:5], [], chosen]
    together = edge_patches(model, clean, corrupted, answers, edge_sets=sets)
    alone = [pw.edge_patch(model, clean, corrupted, answers, edges=s) for s in sets]
    assert max(abs(a - b) for a, b in zip(together, alone)) <= 1e-5
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in   # (left as found)


def test_every_edge_gives_the_source_run_and_none_the_target(model, data, toy_ioi):
    for m, clean, corrupted, answers in [(model, *data), toy_ioi]:
        base = pw.patch(m, clean, corrupted, answers, site="resid_pre", layers=[0], metrics="logit_diff").baselines
        clean_ld, corrupted_ld = (float(base[r]["logit_diff"].mean()) for r in ("clean", "corrupted"))
        graph = Graph.from_model(m)
        tol = 1e-5 * max(1.0, abs(clean_ld), abs(corrupted_ld))
        assert abs(pw.edge_patch(m, clean, corrupted, answers, edges=[]) - corrupted_ld) <= tol
        assert abs(pw.edge_patch(m, clean, corrupted, answers, edges=graph.edges) - clean_ld) <= tol
        assert abs(pw.edge_patch(m, clean, corrupted, answers, edges=[], complement=True) - clean_ld) <= tol
        assert abs(pw.edge_patch(m, clean, corrupted, answers, edges=[], direction="noising") - clean_ld) <= tol
        assert abs(pw.faithfulness(m, clean, corrupted, answers, circuit=graph.edges) - 1) <= 1e-5
        assert abs(pw.faithfulness(m, clean, corrupted, answers, circuit=[])) <= 1e-5


def test_head_to_logits_edges_equal_path_patching(model, data):
    """A head -> logits edge is path patching to the logits with every other path frozen:
    ``path_patch(receivers=None, freeze_mlps=True)``. (By default path patching recomputes the
    MLPs, so a head's path also runs through the MLPs after it: not a single edge.)"""
    clean, corrupted, answers = data
    for direction in ("denoising", "noising"):
        paths = pw.path_patch(model, clean, corrupted, answers, receivers=None, freeze_mlps=True,
                              direction=direction, metrics="logit_diff").grid("logit_diff")
        edges = [[f"a{l}.h{h}->logits"] for l in range(N_LAYERS) for h in range(N_HEADS)]
        got = torch.tensor(edge_patches(model, clean, corrupted, answers, edge_sets=edges, direction=direction))
        assert float((got.view(N_LAYERS, N_HEADS) - paths).abs().max()) <= 1e-5
        assert float(paths.std()) > 1e-2


def test_toy_ioi_top_edges_track_exact_patching(toy_ioi):
    """The 50 top edges of each method, patched one at a time (denoising, logit difference):
    Pearson r of the scores with the exact change. EAP-IG must reach 0.9."""
    model, clean, corrupted, answers = toy_ioi
    methods = {m: pw.edge_attribution(model, clean, corrupted, answers, method=m, progress=False)
               for m in ("eap", "eap-ig")}
    corrupted_ld = pw.edge_patch(model, clean, corrupted, answers, edges=[])
    lines, r = [], {}
    for name, scores in methods.items():
        top = scores.top(50)
        exact = torch.tensor(edge_patches(model, clean, corrupted, answers, edge_sets=[[e] for e in top]))
        rows = [scores.graph.index(e) for e in top]
        for other, s in methods.items():
            r[name, other] = float(torch.corrcoef(torch.stack([s.scores[rows].double(), exact - corrupted_ld]))[0, 1])
        lines.append(f"top 50 of {name:6s}: r(EAP) = {r[name, 'eap']:.3f}, r(EAP-IG) = {r[name, 'eap-ig']:.3f}")
    print("\nedge scores vs exact single-edge patching on toy-ioi:\n" + "\n".join(lines))
    assert r["eap-ig", "eap-ig"] >= 0.9, lines
    assert math.isfinite(r["eap", "eap"])


def test_faithfulness_curve_shares_passes(toy_ioi):
    model, clean, corrupted, answers = toy_ioi
    eap = pw.edge_attribution(model, clean, corrupted, answers, progress=False)
    ks = [0, 1, 5, 20, 50, 100, 200, 500, 1000, eap.graph.n_edges]
    passes = []
    handle = model.blocks[-1].register_forward_hook(lambda *a: passes.append(1))
    try:
        curve = pw.faithfulness_curve(model, clean, corrupted, answers, scores=eap, ks=ks)
        n_curve = len(passes)
        alone = [pw.faithfulness(model, clean, corrupted, answers, circuit=eap.top(k)) for k in ks]
    finally:
        handle.remove()
    assert list(curve.columns[:2]) == ["k", "faithfulness"] and list(curve.k) == ks
    assert max(abs(a - b) for a, b in zip(curve.faithfulness, alone)) <= 1e-5
    assert abs(curve.faithfulness.iloc[0]) <= 1e-5 and abs(curve.faithfulness.iloc[-1] - 1) <= 1e-5
    # the unpatched runs and the self-checks, plus one pass for the 8 points that patch
    # something (10 points of 12 pairs x 20 tokens fit one pass): not one pass per point
    assert n_curve <= 8 < len(passes) - n_curve, (n_curve, len(passes) - n_curve)
    both = pw.faithfulness_curve(model, clean, corrupted, answers, scores={"a": eap, "b": eap}, ks=[10, 100])
    assert list(both.method) == ["a", "a", "b", "b"]


# ---------------------------------------------------------------------------- 4. GQA, offloading
OFFLOAD_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.norm": "disk", "lm_head": "disk",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random 2-layer Llama (rotary, 4 query heads sharing 2 key-value heads), in memory and
    with its second layer and head offloaded to disk."""
    from conftest import _tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama_edges")
    tokenizer = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=len(tokenizer), max_position_embeddings=64, initializer_range=0.1, bos_token_id=0,
        eos_token_id=0, pad_token_id=0)).save_pretrained(folder)
    memory = pw.load_model(str(folder), "cpu")
    offloaded = pw.load_model(str(folder), device_map=OFFLOAD_MAP, offload_folder=tmp_path_factory.mktemp("off"))
    clean = torch.tensor([[0, 2, 3, 5, 4, 6, 7, 3, 8], [0, 2, 4, 5, 3, 6, 7, 4, 8]])
    corrupted = clean.clone()
    corrupted[:, 7] = torch.tensor([4, 3])
    return memory, offloaded, (clean, corrupted, [(3, 4), (4, 3)])


def test_grouped_query_attention_and_offloading(llama):
    memory, offloaded, (clean, corrupted, answers) = llama
    graph = Graph.from_model(memory)
    assert graph.n_edges == _formula(2, 4, 2) and graph.n_kv_heads == 2
    scores = pw.edge_attribution(memory, clean, corrupted, answers, method="eap-ig", steps=2, progress=False)
    again = pw.edge_attribution(offloaded, clean, corrupted, answers, method="eap-ig", steps=2, progress=False)
    assert float((scores.scores - again.scores).abs().max()) <= 1e-5 * max(1.0, float(scores.scores.abs().max()))
    kv_edges = [e for e in scores.top(graph.n_edges) if e.receiver.startswith("a1.kv")][:3] + scores.top(3)
    for m in (memory, offloaded):
        assert abs(pw.faithfulness(m, clean, corrupted, answers, circuit=graph.edges) - 1) <= 1e-5
        assert abs(pw.faithfulness(m, clean, corrupted, answers, circuit=[])) <= 1e-5
    one = edge_patches(memory, clean, corrupted, answers, edge_sets=[[e] for e in kv_edges])
    two = edge_patches(offloaded, clean, corrupted, answers, edge_sets=[[e] for e in kv_edges])
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    with pytest.raises(PatchingInputError, match="shares keys and values"):
        pw.edge_attribution(memory, clean, corrupted, answers, qkv=False, progress=False)


# ---------------------------------------------------------------------------- 5. bad input
def test_bad_input(model, data, toy_model):
    clean, corrupted, answers = data
    ea = pw.edge_attribution

    def refused(fn, field, match):
        with pytest.raises(PatchingInputError, match=match) as err:
            fn()
        assert err.value.field == field, err.value.field

    refused(lambda: ea(model, clean, corrupted, answers, method="acdc"), "method", "method must be one of")
    refused(lambda: ea(model, clean, corrupted, answers, method="eap-ig", steps=0), "steps", "positive integer")
    refused(lambda: ea(model, clean, corrupted, answers, method="eap-ig", steps=2.5), "steps", "positive integer")
    refused(lambda: ea(model, clean, corrupted, answers, metric="rank"), "metrics", "discrete")
    refused(lambda: ea(model, clean, corrupted, answers, metric=["logit_diff", "prob"]), "metrics", "one metric")
    refused(lambda: ea(model, clean, corrupted, answers, batch_size=0), "batch_size", "positive number")
    refused(lambda: ea(model, clean, corrupted, answers, direction="sideways"), "direction", "direction")
    refused(lambda: ea(model, clean, corrupted, None), "answers", "answers")
    refused(lambda: ea(model, clean, corrupted[:, :-1], answers), "corrupted", "same")
    with pytest.raises(IdenticalPromptsError):
        ea(model, clean, clean, answers)
    refused(lambda: ea(object(), clean, corrupted, answers), "model", "TransformerBridge")
    nnsight = pytest.importorskip("nnsight")
    assert nnsight is not None
    lm = pw.load_model("toy-ioi", backend="nnsight")
    refused(lambda: ea(lm, "When John and Mary went", "When Mary and John went", (" Mary", " John")),
            "model", "does not support nnsight models")
    refused(lambda: pw.faithfulness(lm, "When John", "When Mary", (" Mary", " John"), circuit=[]),
            "model", "nnsight")

    patch = pw.edge_patch
    refused(lambda: patch(model, clean, corrupted, answers, edges=["a9.h0->logits"]), "edges", "no node|not a sender")
    refused(lambda: patch(model, clean, corrupted, answers, edges=["a1.h0->a0.h1<q>"]), "edges", "writes after")
    refused(lambda: patch(model, clean, corrupted, answers, edges=["a0.h0 to logits"]), "edges", "not an edge name")
    refused(lambda: patch(model, clean, corrupted, answers, edges=["logits->m1"]), "edges", "only receive")
    refused(lambda: patch(model, clean, corrupted, answers, edges=torch.ones(3, dtype=torch.bool)), "edges",
            "bool tensor of shape")
    refused(lambda: patch(model, clean, corrupted, answers, edges=[3]), "edges", "Edge or an edge name")
    refused(lambda: patch(model, clean, corrupted, answers, edges=[], metric="kl_divergence"), "metrics",
            "unknown metric")
    scores = ea(model, clean, corrupted, answers, progress=False)
    curve = pw.faithfulness_curve
    refused(lambda: curve(model, clean, corrupted, answers, scores=scores, ks=[5, 111]), "ks", "from 0 to 110")
    refused(lambda: curve(model, clean, corrupted, answers, scores=scores, ks=[]), "ks", "non-empty")
    refused(lambda: curve(model, clean, corrupted, answers, scores=[1, 2], ks=[5]), "scores", "EdgeScores")
    refused(lambda: curve(toy_model, clean, corrupted, answers, scores=scores, ks=[5]), "scores", "this model")
    with pytest.raises(DegenerateNormalizationError, match="no difference"):   # (accuracy 0 on both runs)
        pw.faithfulness(model, clean, corrupted, [(60, 61)] * BATCH, circuit=[], metric="accuracy")
