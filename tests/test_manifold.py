"""Manifold-distance probes: streaming statistics, distances against closed forms, calibration, files, the
sweep, and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, no_hooks_left
from scipy import stats

import tl_steer
from tl_steer import AddVector, ContrastivePair
from tl_steer.analysis.manifold import ManifoldProbe, RunningMoments, auroc
from tl_steer.analysis.manifold_sweep import COVARIANCE, ISOTROPIC, manifold_sweep, random_baselines
from tl_steer.analysis.preference_utility import preference_utility


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
_SUBJECTS = ["the world", "the weather", "fresh bread", "a cup of tea", "the film", "the staff", "the food", "the room"]
_WORDS = ["wide", "fine", "wonderful", "kind", "awful", "cold", "dirty", "friendly"]
# 64 short texts in the tiny tokenizer's vocabulary: about 1,000 tokens, enough for d_model = 32.
TEXTS = [
    f"{s} is {w} and {_SUBJECTS[(i + j) % 8]} was {_WORDS[(i * j) % 8]} today."
    for i, s in enumerate(_SUBJECTS)
    for j, w in enumerate(_WORDS)
]
PAIRS = [
    ContrastivePair("The film was", " wonderful and the staff were kind.", " awful and the staff were rude."),
    ContrastivePair("I went to the market and", " bought fresh bread.", " found stale bread."),
    ContrastivePair("hello world, the weather is", " fine today.", " cold and wet today."),
    ContrastivePair("The food was", " wonderful and fresh.", " awful and cold."),
    ContrastivePair("the world is", " wide and kind.", " cold and dirty."),
    ContrastivePair("the room was", " clean and warm.", " dirty and cold."),
]


def gaussian(n, d=6, seed=0, draw=None):
    """n rows of N(mu, C) with a known, anisotropic C (fixed by ``seed``; ``draw`` seeds the rows)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = 5.0 * torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(
        n, d, generator=torch.Generator().manual_seed(seed + 1 if draw is None else draw), dtype=torch.float64
    )
    return x @ torch.linalg.cholesky(C).T + mu, mu, C


def ledoit_wolf_by_hand(x):
    """Ledoit & Wolf (2004), lemma 3.2, written out per sample: shrunk covariance and intensity."""
    x = x - x.mean(0)
    n, d = x.shape
    S = x.T @ x / n
    mu = np.trace(S) / d
    target = mu * np.eye(d)
    d2 = np.sum((S - target) ** 2)
    b2 = sum(np.sum((np.outer(row, row) - S) ** 2) for row in x) / n**2
    s = min(b2, d2) / d2
    return (1 - s) * S + s * target, s


@pytest.fixture(scope="module")
def probe(tiny):
    return ManifoldProbe.fit(tiny, TEXTS, HOOK, k=8, progress=False)


def activations(model, texts, hook=HOOK, fwd_hooks=()):
    """[batch, pos, d] activations at ``hook`` for ``texts`` (right-padded) and the [batch, pos] mask."""
    from tl_steer.scoring import pad_right, pad_token_id

    tok = model.tokenizer
    seqs = [[tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids] for t in texts]
    tokens = pad_right(seqs, pad_token_id(model), "cpu")
    store = {}

    def capture(act, hook):
        store["act"] = act.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[*fwd_hooks, (hook, capture)]):
        model(tokens, return_type=None)
    mask = torch.arange(tokens.shape[1])[None] < torch.tensor([len(s) for s in seqs])[:, None]
    return store["act"], mask, seqs


# ----- streaming statistics --------------------------------------------------------------------------
def test_chunks_merge_in_any_order_to_the_direct_statistics():
    x, _, _ = gaussian(700, d=5)
    direct = RunningMoments.from_batch(x)
    xc = (x - x.mean(0)).numpy()
    np.testing.assert_allclose(direct.M2.numpy(), xc.T @ xc, rtol=1e-12)
    np.testing.assert_allclose(direct.S4, np.sum(np.sum(xc**2, 1) ** 2), rtol=1e-12)
    np.testing.assert_allclose(direct.T3.numpy(), xc.T @ np.sum(xc**2, 1), rtol=1e-9, atol=1e-6)
    cuts = [0, 1, 2, 90, 91, 300, 650, 700]  # chunks of 1 row, empty-free, uneven sizes
    chunks = [RunningMoments.from_batch(x[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    rng = np.random.default_rng(0)
    for _ in range(4):
        order = rng.permutation(len(chunks))
        merged = RunningMoments.empty(5)
        for i in order:
            merged = merged.merge(chunks[i])
        # and as a tree: pairs first
        tree = [chunks[i] for i in order]
        while len(tree) > 1:
            tree = [tree[i].merge(tree[i + 1]) if i + 1 < len(tree) else tree[i] for i in range(0, len(tree), 2)]
        for result in (merged, tree[0]):
            assert result.n == 700
            np.testing.assert_allclose(result.mean.numpy(), direct.mean.numpy(), rtol=1e-12)
            np.testing.assert_allclose(result.M2.numpy(), direct.M2.numpy(), rtol=1e-10)
            np.testing.assert_allclose(result.T3.numpy(), direct.T3.numpy(), rtol=1e-8, atol=1e-6)
            assert abs(result.S4 - direct.S4) <= 1e-10 * direct.S4
            assert result.ledoit_wolf() == pytest.approx(direct.ledoit_wolf(), rel=1e-9)


def test_ledoit_wolf_intensity_matches_the_published_estimator():
    for n, d in ((40, 6), (15, 12), (500, 4)):  # also n < d, where the covariance is singular
        x, _, _ = gaussian(n, d=d, seed=n)
        _, s = ledoit_wolf_by_hand(x.numpy())
        assert RunningMoments.from_batch(x).ledoit_wolf() == pytest.approx(s, rel=1e-9)


def test_streaming_fit_from_arrays_equals_one_shot():
    x, _, _ = gaussian(3000, d=6)
    one = ManifoldProbe.from_activations(x, k=3, n_reference=500, n_calibration=300)
    streamed = ManifoldProbe.from_activations(iter(torch.split(x, 137)), k=3, n_reference=500, n_calibration=300)
    a, b = one.stats["activations"], streamed.stats["activations"]
    assert a.n == b.n and a.n_holdout == b.n_holdout
    np.testing.assert_allclose(a.moments.M2, b.moments.M2, rtol=1e-10)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    assert a.shrinkage == pytest.approx(b.shrinkage, rel=1e-9)
    torch.testing.assert_close(a.reference, b.reference)
    torch.testing.assert_close(a.calibration, b.calibration)
    y, _, _ = gaussian(50, d=6, seed=9)
    pd.testing.assert_frame_equal(one.score(y), streamed.score(y), rtol=1e-7)


# ----- distances against closed forms ------------------------------------------------------------------
def test_mahalanobis_matches_the_closed_form_on_gaussian_data():
    x, mu, C = gaussian(20000, d=6)
    y, _, _ = gaussian(200, d=6, seed=7)
    with pytest.warns(UserWarning, match="no held-out tokens"):
        exact = ManifoldProbe.from_activations(x, k=6, shrinkage=0.0, holdout=0.0)
    xn = x.numpy()
    S = np.cov(xn.T, bias=True)
    z = y.numpy() - xn.mean(0)
    closed = np.sqrt(np.einsum("ij,ij->i", z @ np.linalg.inv(S), z))
    got = exact.mahalanobis(y)
    np.testing.assert_allclose(got["mahalanobis"], closed, rtol=1e-8)
    np.testing.assert_allclose(got["mahalanobis_outside"], 0.0)
    # Against the true covariance of the generator (sampling error only).
    truth = np.sqrt(np.einsum("ij,ij->i", (y - mu).numpy() @ np.linalg.inv(C.numpy()), (y - mu).numpy()))
    assert np.median(np.abs(got["mahalanobis"] / truth - 1)) < 0.02
    # Ledoit-Wolf shrinkage, low rank (k = 2) plus isotropic: against the matrix form, built independently.
    with pytest.warns(UserWarning, match="held-out"):
        shrunk = ManifoldProbe.from_activations(x[:30], k=2, holdout=0.0)  # few tokens: real shrinkage
    Sigma, s = ledoit_wolf_by_hand(x[:30].numpy())
    assert shrunk.stats["activations"].shrinkage == pytest.approx(s, rel=1e-9) and s > 0.01
    evals, evecs = np.linalg.eigh(Sigma)
    U, lam = evecs[:, ::-1][:, :2], evals[::-1][:2]
    sigma2 = evals[::-1][2:].mean()
    z = y.numpy() - x[:30].numpy().mean(0)
    inside = np.sqrt(np.sum((z @ U) ** 2 / lam, 1))
    approx = U @ np.diag(lam) @ U.T + sigma2 * (np.eye(6) - U @ U.T)
    total = np.sqrt(np.einsum("ij,ij->i", z @ np.linalg.inv(approx), z))
    got = shrunk.mahalanobis(y)
    np.testing.assert_allclose(got["mahalanobis_inside"], inside, rtol=1e-7)
    np.testing.assert_allclose(got["mahalanobis"], total, rtol=1e-7)
    np.testing.assert_allclose(got["mahalanobis_outside"] ** 2, total**2 - inside**2, rtol=1e-6)


def test_knn_distance_is_exact():
    x, _, _ = gaussian(400, d=5)
    probe = ManifoldProbe.from_activations(x, knn_k=3, holdout=0.25, n_reference=1000)
    state = probe.stats["activations"]
    y, _, _ = gaussian(20, d=5, seed=3)
    ref = (state.reference.double() - state.mean).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    q = (y - state.mean).numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    brute = np.sort(np.linalg.norm(q[:, None] - ref[None], axis=2), axis=1)[:, 2]
    np.testing.assert_allclose(probe.knn_distance(y), brute, atol=1e-5)
    assert state.reference.shape[0] == state.n  # all reference tokens kept: fewer than n_reference


def test_auroc_is_the_share_of_ordered_pairs():
    rng = np.random.default_rng(0)
    clean, steered = rng.normal(size=40), rng.normal(0.7, 1, size=30)
    steered[:3] = clean[:3]  # ties count half
    brute = np.mean((steered[:, None] > clean[None]) + 0.5 * (steered[:, None] == clean[None]))
    assert auroc(clean, steered) == pytest.approx(brute, rel=1e-12)
    assert auroc(clean, clean) == pytest.approx(0.5)


# ----- calibration ---------------------------------------------------------------------------------------
def test_percentiles_of_new_clean_tokens_are_uniform():
    x, _, _ = gaussian(12000, d=8)
    probe = ManifoldProbe.from_activations(x, k=4, holdout=0.25, n_reference=3000)
    y, _, _ = gaussian(4000, d=8, draw=11)
    table = probe.score(y)
    for name in ("norm", "mahalanobis_inside", "mahalanobis_outside", "mahalanobis", "knn"):
        pct = table[f"{name}_pct"].to_numpy()
        assert abs(pct.mean() - 0.5) < 0.02, name
        assert stats.kstest(pct, "uniform").statistic < 0.04, name
        deciles = np.quantile(pct, np.linspace(0.1, 0.9, 9))
        np.testing.assert_allclose(deciles, np.linspace(0.1, 0.9, 9), atol=0.04, err_msg=name)
    # Far from the data, the Mahalanobis percentile is 1.
    assert (probe.score(100 * y[:5])["mahalanobis_pct"] == 1.0).all()


# ----- on a model ---------------------------------------------------------------------------------------
def test_fit_on_a_model_equals_the_one_shot_computation(tiny_any):
    model = tiny_any
    small = ManifoldProbe.fit(model, TEXTS, [HOOK, "blocks.0.hook_mlp_out"], k=4, batch_size=3, progress=False)
    big = ManifoldProbe.fit(model, TEXTS, [HOOK, "blocks.0.hook_mlp_out"], k=4, batch_size=64, progress=False)
    # One shot, by hand: every text alone, positions 1.., the same seeded held-out draw per text.
    act, mask, seqs = activations(model, TEXTS)
    rng = np.random.default_rng(0)
    train, held = [], []
    for i, seq in enumerate(seqs):
        u = rng.random((len(seq), 2))[1:]
        rows = act[i, 1 : len(seq)]
        train.append(rows[u[:, 0] >= 0.2])
        held.append(rows[u[:, 0] < 0.2])
    train_x, held_x = torch.cat(train).numpy(), torch.cat(held).numpy()
    for fitted in (small, big):
        state = fitted.stats[HOOK]
        assert state.n == len(train_x) and state.n_holdout == len(held_x) and state.n_outliers == 0
        np.testing.assert_allclose(state.mean.numpy(), train_x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state.covariance().numpy(), np.cov(train_x.T, bias=True), rtol=1e-8, atol=1e-12)
        assert state.shrinkage == pytest.approx(ledoit_wolf_by_hand(train_x)[1], rel=1e-8)
        assert state.calibration.shape[0] == len(held_x)
    for name in (HOOK, "blocks.0.hook_mlp_out"):
        torch.testing.assert_close(small.stats[name].reference, big.stats[name].reference)
        torch.testing.assert_close(small.stats[name].moments.M2, big.stats[name].moments.M2, rtol=1e-10, atol=1e-10)
    assert no_hooks_left(model)


def test_top_principal_direction_is_nearer_than_random_of_the_same_norm(tiny, probe):
    state = probe.stats[HOOK]
    top = state.components[:, 0]
    scale = 3.0 * math.sqrt(float(state.component_variances[0]))
    texts = TEXTS[::4]
    clean, mask, _ = activations(tiny, texts)
    mask[:, 0] = False
    means = {}
    for name, direction in [("top", top)] + [
        (f"random{s}", torch.randn(32, generator=torch.Generator().manual_seed(s), dtype=torch.float64))
        for s in range(5)
    ]:
        iv = AddVector(HOOK, scale * direction / direction.norm())
        steered, _, _ = activations(tiny, texts, fwd_hooks=iv.hooks(1.0))
        table = probe.score(steered, clean, mask=mask)
        np.testing.assert_allclose(table["norm_ratio"], (steered.norm(dim=-1) / clean.norm(dim=-1))[mask].numpy())
        means[name] = table["mahalanobis"].mean()
    assert all(means["top"] < means[f"random{s}"] for s in range(5)), means
    # The covariance-matched baseline stays nearer than the isotropic one, on average over seeds.
    iso, cov = [], []
    for seed in range(6):
        a, b = random_baselines(probe, scale, seed=seed, dtype=torch.float64)
        iso.append(probe.mahalanobis(clean[mask] + a.vector)["mahalanobis"].mean())
        cov.append(probe.mahalanobis(clean[mask] + b.vector)["mahalanobis"].mean())
        assert float(a.vector.norm()) == pytest.approx(scale) and float(b.vector.norm()) == pytest.approx(scale)
    assert np.mean(cov) < np.mean(iso)


def test_score_of_a_cache_and_percentiles_of_clean_text(tiny, probe):
    _, cache = tiny.run_with_cache(["the film was kind and the food was fine today."], names_filter=HOOK)
    table = probe.score(cache)
    assert list(table["position"]) == list(range(1, cache[HOOK].shape[1]))
    assert table.columns[:3].tolist() == ["hook", "row", "position"] and not table["outlier"].any()
    assert table.filter(like="_pct").apply(lambda c: c.between(0, 1).all()).all()
    assert "norm_ratio" not in table
    # New clean texts of the same kind sit in the middle of the held-out distribution.
    act, mask, _ = activations(tiny, [t.replace("today", "now") for t in TEXTS[1::2]])
    pct = probe.score(act, mask=mask)[["mahalanobis_pct", "knn_pct"]].mean()
    assert ((pct > 0.3) & (pct < 0.7)).all(), pct


def test_sae_reconstruction_error(tiny):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, dtype="float64"))
    fitted = ManifoldProbe.fit(tiny, TEXTS, HOOK, sae=sae, progress=False)
    act, mask, _ = activations(tiny, TEXTS[:3])
    table = fitted.score(act, mask=mask)
    rows = act[mask & (torch.arange(act.shape[1]) > 0)]
    with torch.no_grad():
        expected = (rows - sae.decode(sae.encode(rows))).norm(dim=1) / rows.norm(dim=1)
    np.testing.assert_allclose(table["sae_error"], expected.numpy(), rtol=1e-10)
    assert table["sae_error_pct"].between(0, 1).all()
    with pytest.raises(tl_steer.ShapeError, match="width"):
        fitted.attach_sae(StandardSAE(StandardSAEConfig(d_in=16, d_sae=8)))
    with pytest.raises(TypeError, match="encode"):
        fitted.attach_sae(object())


def test_save_load_round_trip_and_refusals(tiny, probe, tmp_path):
    path = probe.save(tmp_path / "probe")
    assert path.suffix == ".safetensors"
    loaded = ManifoldProbe.load(path, model=tiny)
    act, mask, _ = activations(tiny, TEXTS[:4])
    pd.testing.assert_frame_equal(probe.score(act, mask=mask), loaded.score(act, mask=mask))
    pd.testing.assert_frame_equal(probe.summary(), loaded.summary())
    assert loaded.model_identity == probe.model_identity and loaded.k == probe.k
    other = make_model("llama", seed=1)
    with pytest.raises(tl_steer.ModelMismatchError):
        ManifoldProbe.load(path, model=other)
    narrow = make_model("llama", d_model=16)
    with pytest.raises(tl_steer.ModelMismatchError, match="d_model"):
        ManifoldProbe.load(path, model=narrow)
    with pytest.raises(tl_steer.ShapeError, match="width 32"):
        probe.score(torch.zeros(2, 5, 16))
    # A probe without a recorded model is still checked for width.
    x, _, _ = gaussian(200, d=16)
    anonymous = ManifoldProbe.from_activations({HOOK: x}).save(tmp_path / "anon.safetensors")
    with pytest.raises(tl_steer.ShapeError, match="width"):
        ManifoldProbe.load(anonymous, model=tiny)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(tl_steer.FileFormatError):
        ManifoldProbe.load(tmp_path / "junk.safetensors")
    iv_path = tl_steer.save(AddVector(HOOK, torch.ones(32, dtype=torch.float64)), tmp_path / "iv")
    with pytest.raises(tl_steer.FileFormatError, match="manifold probe"):
        ManifoldProbe.load(iv_path)


def test_bad_input(tiny):
    with pytest.raises(tl_steer.HookNameError, match="hook_resid_post"):
        ManifoldProbe.fit(tiny, TEXTS, "blocks.1.hook_resid_pots", progress=False)
    with pytest.raises(tl_steer.DataError, match="no texts"):
        ManifoldProbe.fit(tiny, [], HOOK, progress=False)
    with pytest.raises(tl_steer.DataError, match="at least two tokens"):
        ManifoldProbe.fit(tiny, [[5], [7]], HOOK, progress=False)
    with pytest.warns(UserWarning, match=r"only \d+ clean reference tokens .* fewer than 2 x d = 64"):
        few = ManifoldProbe.fit(tiny, TEXTS[:3], HOOK, progress=False)
    assert few.stats[HOOK].n < 64 and 0 < few.stats[HOOK].shrinkage <= 1
    with pytest.raises(ValueError, match="holdout"):
        ManifoldProbe.fit(tiny, TEXTS, HOOK, holdout=1.0, progress=False)
    with pytest.raises(tl_steer.HookNameError, match="several hooks"):
        ManifoldProbe.fit(tiny, TEXTS, [HOOK, "blocks.0.hook_resid_post"], progress=False).score(torch.zeros(3, 32))


def test_outlier_tokens_are_excluded_and_counted():
    x, _, _ = gaussian(1000, d=4)
    x[500:510] *= 1000.0
    fitted = ManifoldProbe.from_activations(x, outlier_factor=10.0)
    state = fitted.stats["activations"]
    assert state.n_outliers == 10 and state.n + state.n_holdout == 990
    assert fitted.score(x[505:507])["outlier"].all()


# ----- the sweep ----------------------------------------------------------------------------------------
def test_manifold_sweep(tiny, probe, tmp_path):
    g = torch.Generator().manual_seed(3)
    iv = AddVector(HOOK, 1.5 * torch.randn(32, generator=g, dtype=torch.float64), method="diffmean")
    ms = (-2.0, 0.0, 1.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = manifold_sweep(tiny, iv, PAIRS, ms, probe, texts="both", progress=False, batch_size=4)
    assert no_hooks_left(tiny)
    assert result.labels == ["diffmean", ISOTROPIC, COVARIANCE]
    assert len(result.table) == 3 * len(ms) * len(PAIRS)
    assert result.baselines[ISOTROPIC] == {"hook": HOOK, "norm": pytest.approx(float(iv.vector.norm()))}
    # UtilOdds are those of preference_utility; m = 0 is the clean model for every condition.
    pu = preference_utility(tiny, iv, PAIRS, ms, progress=False, label="diffmean").table
    mine = result.table[result.table["label"] == "diffmean"].sort_values(["m", "pair"])
    np.testing.assert_allclose(mine["util_odds"], pu.sort_values(["m", "pair"])["util_odds"], atol=1e-9)
    clean = result.table[result.table["m"] == 0.0]
    assert np.allclose(clean["norm_ratio"], 1.0)
    assert clean.groupby("pair")["mahalanobis"].nunique().eq(1).all()
    # The per-pair distance at m = 2 is the mean over the pair's tokens of the probe's score.
    pair = PAIRS[1]
    texts = [pair.prompt + pair.positive, pair.prompt + pair.negative]
    steered, mask, _ = activations(tiny, texts, fwd_hooks=iv.hooks(2.0))
    clean_act, _, _ = activations(tiny, texts)
    table = probe.score(steered, clean_act, mask=mask)
    expected = table.groupby("row")[["mahalanobis", "knn_pct", "norm_ratio"]].mean().mean()
    row = result.table[(result.table["label"] == "diffmean") & (result.table["m"] == 2.0) & (result.table["pair"] == 1)]
    np.testing.assert_allclose(row[["mahalanobis", "knn_pct", "norm_ratio"]].to_numpy()[0], expected, rtol=1e-9)
    summary = result.summary()
    at0 = summary[summary["m"] == 0.0]
    np.testing.assert_allclose(at0["auroc_mahalanobis"], 0.5)
    at2 = summary[(summary["m"] == 2.0) & (summary["label"] == "diffmean")].iloc[0]
    assert at2["auroc_mahalanobis"] > 0.9 and at2["mahalanobis_pct"] > at0["mahalanobis_pct"].iloc[0]
    assoc = result.associations()
    assert set(assoc["label"]) == {"diffmean", ISOTROPIC, COVARIANCE, "all"}
    norm_rows = assoc[assoc["distance"] == "norm_ratio"]
    np.testing.assert_allclose(norm_rows["gain_over_norm"], 0.0, atol=1e-9)
    assert assoc[["spearman_m", "r2_both", "spearman_prompts_delta", "gain_over_norm_delta"]].notna().all().all()
    # The change-from-clean association, by hand for one row.
    mine = result.table[result.table["label"] == "diffmean"].set_index(["m", "pair"])[["mahalanobis", "util_odds"]]
    change = mine.loc[[m for m in ms if m != 0.0]] - mine.loc[0.0]  # aligned on pair
    rhos = [stats.spearmanr(g["mahalanobis"], g["util_odds"]).statistic for _, g in change.groupby(level="m")]
    row = assoc[(assoc["label"] == "diffmean") & (assoc["distance"] == "mahalanobis")].iloc[0]
    assert row["spearman_prompts_delta"] == pytest.approx(np.mean(rhos), rel=1e-9)
    assert (assoc["r2_both"] >= assoc["r2_norm_ratio"] - 1e-12).all()
    png = tmp_path / "sweep.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(result.to_csv(tmp_path / "s.csv", "summary")).shape == summary.shape


def test_sweep_of_an_intervention_at_another_hook(tiny, probe):
    iv = AddVector("blocks.0.hook_resid_post", torch.ones(32, dtype=torch.float64), positions="generated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = manifold_sweep(tiny, iv, PAIRS[:3], (0.0, 1.0), probe, progress=False)
    info = result.baselines[ISOTROPIC]
    assert info["hook"] == HOOK and info["norm"] > 0
    # Only the completion's tokens are steered: earlier prompt tokens keep their clean activations.
    steered = result.tokens[(result.tokens["m"] == 1.0) & (result.tokens["label"] == "add_vector")]
    assert (steered["norm_ratio"] == 1.0).any() and (steered["norm_ratio"] != 1.0).any()
    with pytest.raises(tl_steer.ModelMismatchError):
        manifold_sweep(make_model("llama", seed=2), iv, PAIRS, (0.0, 1.0), probe, progress=False)
