"""Sampling: the batched sampler against float64 per-row references, and through the engine."""

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from inference_svc.errors import InvalidRequest
from inference_svc.sampling import SamplingParams, apply_penalties, sample, sampling_probs

from harness import write_model
from helpers import run_to_completion, tiny_engine, tokens_of

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

PROMPT = [10, 20, 30, 40]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("s")
    return tiny_engine(write_model(root), root / "adapters", 2)


def generate(engine, params, adapter=None, prompt=PROMPT):
    engine.add_request("q", prompt, params, adapter)
    return run_to_completion(engine)["q"]


def test_same_seed_same_tokens_and_different_seed_differs(engine):
    p = SamplingParams(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)
    first, again = tokens_of(generate(engine, p, "a0")), tokens_of(generate(engine, p, "a0"))
    assert first == again
    other = tokens_of(
        generate(engine, SamplingParams(max_tokens=12, temperature=1.5, seed=99, ignore_eos=True), "a0")
    )
    assert other != first


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    greedy = tokens_of(generate(engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    top_k = tokens_of(
        generate(engine, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=5, ignore_eos=True))
    )
    top_p = tokens_of(
        generate(engine, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True))
    )
    assert greedy == top_k == top_p


def run_sample(logits, params, generators=None, prompts=None, outputs=None, shared_seed=0):
    """`sample` with unseeded rows on a fresh shared generator and, unless given, no token history."""
    n, device = len(params), logits.device
    return sample(
        logits,
        params,
        generators or [None] * n,
        torch.Generator(device=device).manual_seed(shared_seed),
        prompts or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
    )


def test_top_k_restricts_the_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    params = [SamplingParams(temperature=5.0, top_k=2)]
    chosen = {run_sample(logits, params, [torch.Generator().manual_seed(s)])[0].token_id for s in range(200)}
    assert chosen == {3, 4}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.7)]
    chosen = {run_sample(logits, params, [torch.Generator().manual_seed(s)])[0].token_id for s in range(300)}
    assert chosen == {0, 1}


# --- the distribution each row draws from, against a float64 per-row reference ----------------


def reference_probs(row: list[float], p: SamplingParams) -> dict[int, float]:
    """{token: probability} a row draws from, in float64 from the definitions, one row at a time."""
    x = [v / p.temperature for v in row]
    top = max(x)
    weights = [math.exp(v - top) for v in x]
    keep = {i for i, w in enumerate(weights) if w >= p.min_p * max(weights)}
    if p.top_k:
        kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
        keep &= {i for i, v in enumerate(x) if v >= kth}  # ties with the k-th stay
    if p.top_p < 1:
        total, mass, nucleus = sum(weights[i] for i in keep), 0.0, set()
        for i in sorted(keep, key=lambda i: (-x[i], i)):  # most likely first, ties in index order
            assert abs(mass - p.top_p) > 1e-5, "top_p sits on a float32 rounding boundary: pick other data"
            if mass >= p.top_p:
                break
            nucleus.add(i)
            mass += weights[i] / total
        keep = nucleus
    total = sum(weights[i] for i in keep)
    return {i: weights[i] / total for i in keep}


GRID = [
    SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp)
    for t in (0.5, 1.0, 2.0)
    for k in (0, 1, 3, 40, 100)  # 40 = V, 100 > V
    for tp in (1.0, 0.77, 0.31)  # not k / m for small m: tied tokens cannot sum to exactly top_p
    for mp in (0.0, 0.1, 1.0)
]


@pytest.mark.parametrize("ties", [False, True])
def test_min_p_top_k_top_p_keep_what_the_reference_keeps(ties):
    gen = torch.Generator().manual_seed(3)
    vocab = 40
    if ties:  # few distinct values: many ties at the k-th token and inside the nucleus
        logits = torch.randint(-4, 4, (len(GRID), vocab), generator=gen).float() * 0.5
    else:
        logits = torch.randn(len(GRID), vocab, generator=gen) * 2
    probs = sampling_probs(logits, GRID)  # [len(GRID), V], one batch
    for row, p, got in zip(logits.tolist(), GRID, probs):
        want = reference_probs(row, p)
        assert set(got.nonzero().flatten().tolist()) == set(want), p
        assert got[list(want)].tolist() == pytest.approx(list(want.values()), rel=1e-4), p


def test_disabled_filters_keep_every_token_even_when_a_neighbour_sorts():
    # a long tail: float32 cumulative sums reach 1 before its end, so top_p=1 must not be a cut
    row = torch.linspace(25, -25, 2000)  # [V]
    logits = torch.stack([row] * 5)  # [5, V]
    params = [
        SamplingParams(top_p=1.0),
        SamplingParams(top_k=2000),  # = V
        SamplingParams(top_k=5000),  # > V
        SamplingParams(min_p=0.0, top_p=1.0, top_k=0),
        SamplingParams(top_p=0.5, top_k=7),  # makes the batch take the sorting path
    ]
    probs = sampling_probs(logits, params)
    assert (probs[:4] > 0).all()
    assert (probs[4] > 0).sum() < 7


def test_top_p_keeps_the_smallest_set_reaching_it_exactly():
    # four equal tokens (0.25 each, exact in float32): top_p=0.5 is reached by two of them
    probs = sampling_probs(torch.zeros(1, 4), [SamplingParams(top_p=0.5)])
    assert probs[0].tolist() == [0.5, 0.5, 0.0, 0.0]  # ties cut in index order


# --- sample(): greedy, seeds, penalties, the drawn distribution, bad rows ----------------------


def test_greedy_rows_take_the_argmax_and_tiny_temperatures_are_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5, top_k=4),
        SamplingParams(temperature=1e-40),  # would be inf / NaN if divided by
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=1e-6, top_p=0.5),
        SamplingParams(temperature=0.7, top_p=0.9),
    ]
    out = run_sample(logits, params, generators=[None, torch.Generator().manual_seed(1)] + [None] * 4)
    argmax = logits.argmax(-1).tolist()
    assert [out[i].token_id for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    lp = torch.log_softmax(logits, -1)
    for i, tok in enumerate(out):
        assert 0 <= tok.token_id < 50
        assert tok.logprob == pytest.approx(lp[i, tok.token_id].item(), abs=1e-5)  # unmodified distribution


def seeded_tokens(row, others, position, seed=7, steps=30):
    """Tokens a row with its own generator draws over `steps` steps, at `position` among `others`
    ([(logits [V], params, generator)]); the shared generator is reseeded differently each step."""
    batch = (
        others[:position] + [(row, SamplingParams(), torch.Generator().manual_seed(seed))] + others[position:]
    )
    logits = torch.stack([r for r, _, _ in batch])  # [n, V]
    params, gens = [p for _, p, _ in batch], [g for _, _, g in batch]
    return [run_sample(logits, params, gens, shared_seed=step)[position].token_id for step in range(steps)]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch_or_their_position():
    vocab = 32
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(vocab, generator=gen)

    def crowd():
        return [
            (torch.randn(vocab, generator=gen), SamplingParams(temperature=0.9, top_k=5), None),
            (torch.randn(vocab, generator=gen), SamplingParams(temperature=0), None),
            (torch.randn(vocab, generator=gen), SamplingParams(top_p=0.5), torch.Generator().manual_seed(8)),
            (torch.randn(vocab, generator=gen), SamplingParams(min_p=0.3, presence_penalty=1.0), None),
        ]

    alone = seeded_tokens(row, [], 0)
    assert len(set(alone)) > 3  # it really samples
    assert seeded_tokens(row, crowd(), 0) == alone
    assert seeded_tokens(row, crowd(), 3) == alone
    assert seeded_tokens(row, [], 0, seed=9) != alone


def filtered_counts(logits_row, p, generators):
    n = len(generators)
    out = run_sample(logits_row.expand(n, -1).contiguous(), [p] * n, generators)
    return Counter(t.token_id for t in out)


@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "per-row-generators"])
def test_draws_follow_the_filtered_distribution(seeded):
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -3.0, 2.0, 1.9])
    p = SamplingParams(temperature=0.8, top_k=6, min_p=0.05, top_p=0.95)
    want = reference_probs(row.tolist(), p)
    assert 2 < len(want) < 7  # every filter matters here
    n = 6000
    generators = [torch.Generator().manual_seed(s) for s in range(n)] if seeded else [None] * n
    counts = filtered_counts(row, p, generators)
    assert set(counts) == set(want)  # masked tokens are never drawn
    chi2 = sum((counts[i] - n * q) ** 2 / (n * q) for i, q in want.items())
    assert chi2 < 30  # <= 5 degrees of freedom: P(chi2 > 30) < 2e-5; the seeds are fixed


def reference_penalised(logits: list[float], prompt, output, p: SamplingParams) -> list[float]:
    out_counts = Counter(output)
    seen = set(prompt) | set(output)
    adjusted = []
    for t, v in enumerate(logits):
        if t in seen:
            v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        adjusted.append(v - p.frequency_penalty * out_counts[t] - p.presence_penalty * (out_counts[t] > 0))
    return adjusted


def test_penalties_match_a_hand_computed_reference():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0]] * 3)
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
        SamplingParams(frequency_penalty=1.0, presence_penalty=0.5),
    ]
    prompts, outputs = [[0, 1], [0, 1], [4]], [[2, 2, 3], [2, 2, 3], [2, 2, 3]]
    adjusted = apply_penalties(logits, params, prompts, outputs)
    # 0: prompt, > 0: 2 / 2.  1: prompt, < 0: -1 * 2.  2: twice in the output: 0.5 / 2 - 2 * 0.5 - 0.25.
    # 3: once: -0.5 * 2 - 0.5 - 0.25.  4, 5: unseen.
    assert adjusted[0].tolist() == [1.0, -2.0, -1.0, -1.75, 1.0, 0.0]
    assert torch.equal(adjusted[1], logits[1])  # no penalties: untouched
    # frequency and presence count output tokens only (4 is in the prompt)
    assert adjusted[2].tolist() == [2.0, -1.0, -2.0, -2.0, 1.0, 0.0]
    assert adjusted[2].tolist() == reference_penalised(logits[2].tolist(), [4], [2, 2, 3], params[2])
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, 0.0]))  # input not changed
    assert apply_penalties(logits, [SamplingParams()] * 3, prompts, outputs) is logits


def test_penalties_steer_greedy_rows_but_not_logprobs():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(temperature=0)]
    out = run_sample(logits, params, outputs=[[0], [0]])
    assert [t.token_id for t in out] == [1, 0]
    assert out[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[1].item(), abs=1e-6)


def test_a_row_with_non_finite_logits_does_not_fail_the_step():
    vocab = 64
    good = torch.randn(vocab, generator=torch.Generator().manual_seed(2))
    inf_row = torch.full((vocab,), -math.inf)
    inf_row[3] = math.inf
    logits = torch.stack([good, torch.full((vocab,), math.nan), inf_row, torch.full((vocab,), -math.inf)])
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=10, min_p=0.05, frequency_penalty=0.5)
    gens = [torch.Generator().manual_seed(1) for _ in range(4)]
    out = run_sample(logits, [p] * 4, gens, outputs=[[1, 2]] * 4)
    assert all(0 <= t.token_id < vocab for t in out)
    alone = run_sample(good[None], [p], [torch.Generator().manual_seed(1)], outputs=[[1, 2]])
    assert out[0] == alone[0]  # its neighbours do not disturb a good row


def test_a_zero_noise_draw_never_picks_a_masked_token(monkeypatch):
    # CPU exponential_ can return 0 (pytorch#22557); force it: masked tokens would score 0 / 0 = NaN
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, generator=None: self.zero_())
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    assert run_sample(logits, [SamplingParams(top_k=2)])[0].token_id in {1, 2}


# --- stays on the device ------------------------------------------------------------------------


class OpLog(TorchDispatchMode):
    """Counts the aten ops run inside it and notes any output tensor away from `device`."""

    def __init__(self, device):
        super().__init__()
        self.device, self.ops, self.elsewhere = torch.device(device), Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                self.elsewhere.append((func, tuple(t.shape)))
        return out


def mixed_params(i: int) -> SamplingParams:
    return [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=0.9, top_k=5),
        SamplingParams(temperature=1.1, top_p=0.8, min_p=0.05, logprobs=3),
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5),
    ][i % 4]


def logged_sample(device, params, vocab=1000):
    logits = torch.randn(len(params), vocab, device=device)
    prompts, outputs = [[1, 2, 3]] * len(params), [[4, 4]] * len(params)
    with OpLog(device) as log:
        out = run_sample(logits, params, prompts=prompts, outputs=outputs)
    return log, out


@pytest.mark.parametrize("device", DEVICES)
def test_one_batched_pass_whatever_the_batch_size_and_nothing_read_back_early(device):
    """What this proves on CPU: one call runs the same aten ops for 8 rows as for 48 (no Python
    loop over rows doing tensor math; seeded rows, by design, add one noise draw each), sorts once,
    and never reads a tensor's value into Python mid-way (`_local_scalar_dense` is what `.item()`,
    `int(t)` and `if t:` run, each a device sync on CUDA); only the final `.tolist()` reads. On CUDA
    it also proves that no tensor of V or more elements is made anywhere but on the device."""
    small, _ = logged_sample(device, [mixed_params(i) for i in range(8)])  # >= 2 rows of each kind
    large, out = logged_sample(device, [mixed_params(i) for i in range(48)])
    assert small.ops == large.ops
    assert large.ops["sort"] == 1 and "_local_scalar_dense" not in large.ops
    assert all(math.prod(shape) < 1000 for _, shape in large.elsewhere), large.elsewhere
    assert len(out) == 48 and len(out[2].top_logprobs) == 3
    plain, _ = logged_sample(device, [SamplingParams(temperature=0.8)] * 8)
    assert "sort" not in plain.ops  # no row asks for top-k or top-p: no sort
    assert "scatter_add" not in plain.ops  # nor penalties: no counts tensor


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -math.inf),
        ("frequency_penalty", math.nan),
        ("presence_penalty", -2.01),
        ("presence_penalty", math.inf),
    ],
)
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value}).validate(100)
    assert e.value.field == field and str(e.value).startswith(f"{field}:"), str(e.value)


def test_edge_values_are_accepted():
    for p in (
        SamplingParams(min_p=0.0, repetition_penalty=1e-3, frequency_penalty=-2.0, presence_penalty=2.0),
        SamplingParams(min_p=1.0, repetition_penalty=50.0, frequency_penalty=2.0, presence_penalty=-2.0),
        SamplingParams(temperature=1e-40),
    ):
        p.validate(100)


# --- through the engine ------------------------------------------------------------------------


def test_seeded_request_gets_the_same_tokens_alone_and_in_a_batch(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    alone = tokens_of(generate(engine, p, "a0"))
    engine.add_request(
        "x", [1, 2, 3], SamplingParams(max_tokens=6, temperature=1.0, top_k=5, ignore_eos=True)
    )
    engine.add_request(
        "y", [9, 8], SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=8, ignore_eos=True), "a1"
    )
    engine.add_request("q", PROMPT, p, "a0")
    outputs = run_to_completion(engine)
    assert tokens_of(outputs["q"]) == alone
    assert len(tokens_of(outputs["x"])) == 6 and len(tokens_of(outputs["y"])) == 12


def test_engine_penalises_over_each_requests_own_history(engine):
    p = SamplingParams(
        max_tokens=10,
        temperature=0,
        repetition_penalty=1.5,
        frequency_penalty=1.0,
        presence_penalty=0.5,
        ignore_eos=True,
    )
    engine.record_logits = True
    try:
        engine.add_request("other", [7, 7, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        out = generate(engine, p, "a0")
    finally:
        engine.record_logits = False
    history, steered = [], False
    for o in out:
        raw = o.logits.tolist()
        want = reference_penalised(raw, PROMPT, history, p)
        assert o.token.token_id == max(range(len(want)), key=want.__getitem__)
        steered |= o.token.token_id != o.logits.argmax().item()
        history.append(o.token.token_id)
    assert steered  # the penalties changed at least one choice


def test_max_tokens_and_stop_token_ids(engine):
    out = generate(engine, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    tokens = tokens_of(out)
    assert len(tokens) == 7 and out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 7
    stop_id = tokens[3]
    stopped = generate(
        engine, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,))
    )
    first = tokens.index(stop_id)
    assert tokens_of(stopped) == tokens[: first + 1]
    assert stopped[-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(engine):
    tokens = tokens_of(generate(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    eos = tokens[2]
    original = engine.eos_token_ids
    engine.eos_token_ids = frozenset({eos})  # as if the checkpoint said so
    try:
        stopped = generate(engine, SamplingParams(max_tokens=6, temperature=0))
        assert tokens_of(stopped) == tokens[: tokens.index(eos) + 1] and stopped[-1].finish_reason == "stop"
        assert (
            tokens_of(generate(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
            == tokens
        )
    finally:
        engine.eos_token_ids = original


def test_stop_string_ends_text_before_it(engine):
    full = generate(engine, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "a1")
    text = "".join(o.text for o in full)
    assert len(text) >= 4
    stop = text[2:4]
    out = generate(engine, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,)), "a1")
    got = "".join(o.text for o in out)
    assert got == text[: text.find(stop)]
    assert out[-1].finish_reason == "stop"


def test_logprobs_are_the_models_distribution(engine):
    engine.record_logits = True
    try:
        out = generate(engine, SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True), "a0")
    finally:
        engine.record_logits = False
    for o in out:
        lp = torch.log_softmax(o.logits, -1)
        assert o.token.logprob == pytest.approx(lp[o.token.token_id].item(), abs=1e-5)
        ids = [t for t, _ in o.token.top_logprobs]
        assert ids == lp.topk(3).indices.tolist()
        assert ids[0] == o.token.token_id  # greedy picks the most likely
        vals = [v for _, v in o.token.top_logprobs]
        assert vals == sorted(vals, reverse=True)
