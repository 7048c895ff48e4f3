#!/usr/bin/env python3
"""End-to-end test of the `clnsa` tool: writes .npy inputs, runs `clnsa run`, and compares
o, the block index sets and (with --do) the gradients with the float64 NumPy reference
(tests/nsa_numpy.py), whose backward is itself checked against finite differences here.

usage: test_cli.py path/to/clnsa     (meson passes the built tool)
Environment: CLNSA_DEVICE picks the device, CLNSA_TEST_SEED replays a run, CLNSA_CACHE_DIR
keeps compiled kernels between runs. Prints TAP and a last line "N passed, M failed";
exits 0, 1 on a failure, or 77 (skipped) without numpy or without an OpenCL device.
"""
import os
import subprocess
import sys
import tempfile
import time

SKIP = 77
try:
    import numpy as np
except ImportError:
    print("1..0 # SKIP numpy is not installed")
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nsa_numpy import nsa_backward, nsa_forward  # noqa: E402

TOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2}
GATE = {"c": "cmp", "s": "slc", "w": "swa"}


def round_to(x, dtype):
    """The values the device holds: float32 input rounded (to nearest even) to dtype."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
def case(name, **kw):
    c = dict(name=name, B=1, TQ=None, TK=100, HQ=4, H=2, DK=32, DV=16, BS=16, S=4, W=0,
             dtype="f32", gates="cs", cu_q=None, cu_k=None, given=False, counts=False,
             scale=None, file_dtype="float32", int_dtype="int32", grad=False, dg=None)
    c.update(kw)
    if c["dg"] is None:  # the gate gradients asked for: every gate given
        c["dg"] = c["gates"]
    if c["TQ"] is None:
        c["TQ"] = c["TK"]
    if c["cu_q"] is not None:
        c["TQ"] = c["cu_q"][-1]
        c["TK"] = (c["cu_k"] or c["cu_q"])[-1]
    return c


CASES = [
    case("G=1, gates cmp+slc", TK=130, HQ=2, H=2),
    case("G=3, window 20, all gates, B=2, DK != DV", B=2, TK=100, HQ=6, H=2, DK=24, DV=40,
         S=5, W=20, gates="csw"),
    case("G=16, no gates", TK=150, HQ=16, H=1, BS=32, S=3),
    case("G=16, f16, gates cmp+slc", TK=150, HQ=16, H=1, BS=32, S=3, dtype="f16"),
    case("G=3, window 20, all gates, f16", B=2, TK=100, HQ=6, H=2, S=5, W=20, gates="csw",
         dtype="f16"),
    case("G=3, window 20, all gates, bf16", B=2, TK=100, HQ=6, H=2, S=5, W=20, gates="csw",
         dtype="bf16"),
    case("varlen (cu_seqlens), window 24", cu_q=[0, 37, 100, 181], HQ=4, H=2, W=24,
         gates="csw"),
    case("varlen with cu_seqlens_k (TQ_s < TK_s)", cu_q=[0, 5, 6, 30], cu_k=[0, 40, 90, 150],
         HQ=3, H=1, W=16, gates="csw"),
    case("varlen, bf16", cu_q=[0, 50, 51, 140], HQ=4, H=2, dtype="bf16"),
    case("TQ < TK (decode chunk), window 32", B=2, TQ=7, TK=130, HQ=6, H=2, W=32, gates="csw"),
    case("window on, g_swa only, f16", TK=90, W=16, gates="w", dtype="f16"),
    case("window 16 without g_swa (branch off)", TK=90, W=16, gates="c"),
    case("given block_indices (-1, duplicates, beyond IC)", TK=96, HQ=4, H=2, S=6, given=True,
         gates="cs"),
    case("per-token block_counts", TK=120, HQ=4, H=2, S=5, counts=True),
    case("scale 0.3, float64 files, int64 counts", TK=80, HQ=4, H=1, scale=0.3,
         counts=True, file_dtype="float64", int_dtype="int64"),
    case("float16 files, bf16 storage", TK=80, HQ=2, H=1, file_dtype="float16",
         dtype="bf16"),
]


# Forward then backward (--do): T <= 40, D <= 16. Every gradient is checked: dq, dk, dv
# and dg of each gate in "dg" (default: every gate given).
GRAD_CASES = [case("grad: " + name, grad=True, **kw) for name, kw in [
    ("G=1, gates cmp+slc", dict(TK=40, HQ=2, H=2, DK=16, DV=8, BS=8, S=3)),
    ("G=1, gates cmp+slc, bf16", dict(TK=40, HQ=2, H=2, DK=16, DV=8, BS=8, S=3,
                                      dtype="bf16")),
    ("G=3, window 12, all gates, B=2, DK != DV", dict(B=2, TK=36, HQ=6, H=2, DK=12, DV=16,
                                                      BS=8, S=3, W=12, gates="csw")),
    ("G=3, window 12, all gates, f16", dict(B=2, TK=36, HQ=6, H=2, DK=12, DV=16, BS=8, S=3,
                                            W=12, gates="csw", dtype="f16")),
    ("G=3, window 12, all gates (dg of g_slc only), bf16",
     dict(B=2, TK=36, HQ=6, H=2, DK=12, DV=16, BS=8, S=3, W=12, gates="csw", dg="s",
          dtype="bf16")),
    ("G=16, no gates", dict(TK=33, HQ=16, H=1, DK=8, DV=8, BS=8, S=3, gates="")),
    ("G=16, gates cmp+slc, f16", dict(TK=33, HQ=16, H=1, DK=8, DV=8, BS=8, S=3, dtype="f16")),
    ("G=16, window 40 (dense), all gates, bf16", dict(TK=33, HQ=16, H=1, DK=8, DV=8, BS=8,
                                                       S=2, W=40, gates="csw", dtype="bf16")),
    ("varlen, window 8, all gates", dict(cu_q=[0, 13, 14, 40], HQ=4, H=2, DK=16, DV=8, BS=8,
                                         S=3, W=8, gates="csw")),
    ("varlen, window 8, all gates, f16", dict(cu_q=[0, 13, 14, 40], HQ=4, H=2, DK=16, DV=8,
                                              BS=8, S=3, W=8, gates="csw", dtype="f16")),
    ("varlen, G=3, gates cmp+slc, bf16", dict(cu_q=[0, 21, 40], HQ=3, H=1, DK=8, DV=16, BS=4,
                                              S=4, dtype="bf16")),
    ("window off, g_swa given (dg_swa = 0)", dict(TK=32, HQ=4, H=2, DK=8, DV=8, BS=8, S=2,
                                                  gates="csw")),
    ("window 10, g_swa only, f16", dict(TK=32, HQ=4, H=2, DK=16, DV=8, BS=8, S=2, W=10,
                                        gates="w", dtype="f16")),
    ("given block_indices (-1, duplicates, beyond IC)", dict(TK=32, HQ=4, H=2, DK=8, DV=8,
                                                             BS=4, S=5, given=True)),
    ("per-token block_counts, scale 0.3", dict(TK=40, HQ=4, H=2, DK=8, DV=8, BS=4, S=4,
                                               counts=True, scale=0.3)),
]]

# The NumPy backward against central differences of the NumPy forward (tiny shapes).
FD_CASES = [
    case("B=2, G=2, window 4, all gates", B=2, TK=10, HQ=4, H=2, DK=3,
         DV=2, BS=3, S=2, W=4, gates="csw", grad=True),
    case("varlen, G=3, g_slc + g_swa with window 0", cu_q=[0, 4, 11], HQ=3, H=1, DK=2, DV=3,
         BS=2, S=2, gates="sw", grad=True),
    case("given block_indices, no gates", TK=9, HQ=2, H=1, DK=2, DV=2, BS=2, S=4, gates="",
         given=True, grad=True),
]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def make_inputs(c, rng):
    """float32 arrays (never zero). Keys get a per-block offset so that pooled keys differ
    and top-k importances are well separated (ties improbable)."""
    B, TQ, TK, HQ, H, DK, DV, BS = (c[x] for x in ("B", "TQ", "TK", "HQ", "H", "DK", "DV", "BS"))
    x = {"q": rng.uniform(-1, 1, (B, TQ, HQ, DK))}
    bias = rng.uniform(-1, 1, (B, -(-TK // BS), H, DK))
    x["k"] = 0.5 * rng.uniform(-1, 1, (B, TK, H, DK)) + np.repeat(bias, BS, axis=1)[:, :TK]
    x["v"] = rng.uniform(-1, 1, (B, TK, H, DV))
    for g in c["gates"]:
        x["g_" + GATE[g]] = 1 / (1 + np.exp(-rng.uniform(-3, 3, (B, TQ, HQ))))
    if c["grad"]:
        x["do"] = rng.uniform(-1, 1, (B, TQ, HQ, DV))
    x = {name: a.astype(np.float32) for name, a in x.items()}
    if c["given"]:
        nb = -(-TK // BS)
        x["block_indices"] = rng.integers(-1, nb + 2, (B, TQ, H, c["S"])).astype(np.int32)
    if c["counts"]:
        x["block_counts"] = rng.integers(0, c["S"] + 1, (B, TQ, H)).astype(np.int32)
    return x


def write_inputs(c, x, tmp):
    """Writes the .npy files; returns the tool's options and the values it will see."""
    args, seen = [], {}
    for name, a in x.items():
        path = os.path.join(tmp, name + ".npy")
        if a.dtype.kind == "f":
            stored = a.astype(c["file_dtype"])
            seen[name] = round_to(stored.astype(np.float32), c["dtype"])
        else:
            stored = a.astype(c["int_dtype"])
            seen[name] = a
        np.save(path, stored)
        args += ["--" + name.replace("_", "-"), path]
    for name in ("cu_q", "cu_k"):
        if c[name] is not None:
            path = os.path.join(tmp, name + ".npy")
            np.save(path, np.array(c[name], dtype=c["int_dtype"]))
            args += ["--cu-seqlens" if name == "cu_q" else "--cu-seqlens-k", path]
    args += ["--block-size", str(c["BS"]), "--window", str(c["W"]), "--dtype", c["dtype"]]
    if not c["given"]:
        args += ["--block-count", str(c["S"])]
    if c["scale"] is not None:
        args += ["--scale", str(c["scale"])]
    return args, seen


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------
def compare_selection(dev, ref, imp, tol):
    """Block index sets, slot order ignored. A set that differs is accepted only as a near
    tie: the blocks swapped are non-forced candidates whose importances agree within tol.
    Returns (same, near_ties, [problems])."""
    same = near = 0
    problems = []
    for pos in np.ndindex(dev.shape[:-1]):
        d_row, r_row = list(dev[pos]), list(ref[pos])
        n = sum(1 for v in d_row if v >= 0)
        if d_row[:n] != sorted(set(d_row[:n])) or any(v != -1 for v in d_row[n:]):
            problems.append(f"{pos}: {d_row} is not ascending blocks then -1")
            continue
        d, r = set(d_row[:n]), {v for v in r_row if v >= 0}
        if d == r:
            same += 1
            continue
        w = imp[pos]
        ic = int(np.sum(~np.isnan(w)))  # importances exist exactly for c < IC
        extra, missing = d - r, r - d
        forced = {ic, ic - 1, 0}
        ok = len(d) == len(r) and not (extra | missing) & forced and \
            all(0 <= c < ic for c in extra)
        if ok and max(w[c] for c in missing) - min(w[c] for c in extra) <= \
                tol * max(w[c] for c in missing):
            near += 1
        else:
            problems.append(f"{pos}: device {sorted(d)}, reference {sorted(r)}")
    return same, near, problems


def check_selection(c, x, idx, ref):
    """(same, near ties, [problems]) of the block indices the tool wrote."""
    if idx.shape != ref.block_indices.shape or idx.dtype != np.int32:
        return 0, 0, [f"block indices {idx.dtype}{idx.shape}, expected "
                      f"int32{ref.block_indices.shape}"]
    if c["given"]:
        same = int(np.prod(idx.shape[:-1]))
        ok = np.array_equal(idx, x["block_indices"])
        return same, 0, [] if ok else ["block indices written differ from those given"]
    same, near, bad = compare_selection(idx, ref.block_indices, ref.importance, TOL[c["dtype"]])
    return same, near, bad[:5] + ([f"... {len(bad) - 5} more"] if len(bad) > 5 else [])


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def reference_kwargs(c, seen, block_indices=None):
    """nsa_forward's / nsa_backward's keyword arguments for a case (given block indices
    override the case's own)."""
    kw = {name: seen[name] for name in ("g_cmp", "g_slc", "g_swa", "block_counts")
          if name in seen}
    return dict(kw, block_size=c["BS"], block_count=c["S"], window=c["W"], scale=c["scale"],
                cu_seqlens=c["cu_q"], cu_seqlens_k=c["cu_k"],
                block_indices=block_indices if block_indices is not None
                else seen.get("block_indices"))


def reference(c, seen, block_indices=None):
    return nsa_forward(seen["q"], seen["k"], seen["v"],
                       **reference_kwargs(c, seen, block_indices))


def reference_grads(c, seen, block_indices=None):
    return nsa_backward(seen["q"], seen["k"], seen["v"], seen["do"],
                        **reference_kwargs(c, seen, block_indices))


def grad_names(c):
    return ["dq", "dk", "dv"] + ["dg_" + GATE[g] for g in c["dg"]]


def finite_difference_errors(c, rng, h=1e-5):
    """Relative error of nsa_backward against central differences of L = sum(do * o) from
    nsa_forward, for each differentiable input; block indices held at the unperturbed
    forward's (they are constants of the backward)."""
    x = make_inputs(c, rng)
    seen = {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in x.items()}
    idx = reference(c, seen).block_indices
    kw = reference_kwargs(c, seen, block_indices=idx)
    ana = reference_grads(c, seen, block_indices=idx)
    errors = {}
    for name in ["q", "k", "v"] + ["g_" + GATE[g] for g in c["gates"]]:
        a = seen[name]  # perturbed in place: kw holds the same gate arrays
        num = np.zeros_like(a)
        for pos in np.ndindex(a.shape):
            keep = a[pos]
            loss = []
            for step in (h, -h):
                a[pos] = keep + step
                loss.append(np.sum(seen["do"] * nsa_forward(seen["q"], seen["k"], seen["v"],
                                                            **kw).o))
            a[pos] = keep
            num[pos] = (loss[0] - loss[1]) / (2 * h)
        errors["d" + name] = rel_error(getattr(ana, "d" + name), num)
    return errors


class Runner:
    def __init__(self, tool, tmp):
        self.tool, self.tmp = tool, tmp
        self.results = []

    def run(self, args, timeout=300):
        t = time.time()
        p = subprocess.run([self.tool] + args, capture_output=True, text=True,
                           timeout=timeout)
        return p, time.time() - t

    def report(self, name, ok, detail="", diag=""):
        self.results.append(ok)
        print(f"{'ok' if ok else 'not ok'} {len(self.results)} - {name}"
              + (f" # {detail}" if detail else ""), flush=True)
        if diag and not ok:
            for line in diag.rstrip().splitlines()[-20:]:
                print("#   " + line)

    def case(self, c, rng):
        """Runs the forward (and with c["grad"] the backward) of a case and checks o, the
        block index sets and each gradient against the NumPy reference."""
        d = tempfile.mkdtemp(dir=self.tmp)
        x = make_inputs(c, rng)
        args, seen = write_inputs(c, x, d)
        outs = ["o"] + (grad_names(c) if c["grad"] else [])
        paths = {name: os.path.join(d, name + "_out.npy") for name in outs + ["idx"]}
        for name in outs:
            args += ["--out" if name == "o" else "--" + name.replace("_", "-"), paths[name]]
        p, secs = self.run(["run"] + args + ["--out-block-indices", paths["idx"]])
        if p.returncode != 0:
            self.report(c["name"], False, f"exit {p.returncode}",
                        p.stderr + "\ncommand: clnsa run " + " ".join(args))
            return
        idx = np.load(paths["idx"])
        ref = reference(c, seen)
        tol = TOL[c["dtype"]]
        same, near, problems = check_selection(c, x, idx, ref)
        use_idx = idx if near and not problems else None  # near ties follow the device
        expected = {"o": reference(c, seen, use_idx).o if use_idx is not None else ref.o}
        if c["grad"]:
            g = reference_grads(c, seen, use_idx)
            expected.update((name, getattr(g, name)) for name in grad_names(c))
        errors = {}
        for name, want in expected.items():
            got = np.load(paths[name])
            errors[name] = rel_error(got, want) if got.shape == want.shape else float("inf")
            if got.shape != want.shape or got.dtype != np.float32:
                problems.append(f"{name} is {got.dtype}{got.shape}, expected "
                                f"float32{want.shape}")
            if not errors[name] < tol:
                problems.append(f"{name}: relative error {errors[name]:.3e} >= {tol:.0e}")
        detail = (f"{c['dtype']} rel err " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
                  + f" (tol {tol:.0e}), sets {same} same"
                  + (f", {near} near ties" if near else "") + f", {secs:.1f} s")
        self.report(c["name"], not problems, detail, "\n".join(problems))

    def finite_difference_case(self, c, rng):
        t = time.time()
        errors = finite_difference_errors(c, rng)
        worst = max(errors.values())
        self.report("NumPy backward = finite differences: " + c["name"], worst < 1e-6,
                    "rel err " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
                    + f", {time.time() - t:.1f} s", f"worst {worst:.3e} >= 1e-6")

    def error_case(self, name, args, rc, needle):
        p, _ = self.run(args)
        ok = p.returncode == rc and needle in p.stderr + p.stdout
        self.report(name, ok, f"exit {p.returncode}", f"expected exit {rc} and '{needle}'; "
                    f"stdout: {p.stdout[-300:]}\nstderr: {p.stderr[-600:]}")


def bad_files(tmp, rng):
    q = rng.uniform(-1, 1, (1, 20, 2, 8)).astype(np.float32)
    good = os.path.join(tmp, "good.npy")
    np.save(good, q)
    kv = os.path.join(tmp, "kv.npy")
    np.save(kv, q[:, :, :1])
    truncated = os.path.join(tmp, "truncated.npy")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:-10])
    big = os.path.join(tmp, "big_endian.npy")
    np.save(big, q.astype(">f4"))
    wrong_dk = os.path.join(tmp, "wrong_dk.npy")
    np.save(wrong_dk, q[:, :, :1, :5].copy())
    short = os.path.join(tmp, "short.npy")  # TQ = 5 < TK = 20; also its do (DV = DK)
    np.save(short, q[:, :5].copy())
    return good, kv, truncated, big, wrong_dk, short


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    tool = os.path.abspath(sys.argv[1])
    devices = subprocess.run([tool, "devices"], capture_output=True, text=True, timeout=120)
    if devices.returncode != 0 and "no OpenCL device" in devices.stderr:
        print("1..0 # SKIP no OpenCL device: " + devices.stderr.strip())
        return SKIP
    seed = int(os.environ.get("CLNSA_TEST_SEED") or time.time_ns() % 2**32)
    print(f"# seed {seed} (replay with CLNSA_TEST_SEED={seed})")
    rng = np.random.default_rng(seed)
    default = [line for line in devices.stdout.splitlines() if "(default)" in line]
    print("# default device: " + (default[0] if default else "?"))
    print(f"1..{len(CASES) + len(FD_CASES) + len(GRAD_CASES) + 14}", flush=True)

    with tempfile.TemporaryDirectory(prefix="clnsa-cli-") as tmp:
        r = Runner(tool, tmp)
        r.report("clnsa devices lists a default device", devices.returncode == 0 and
                 bool(default), f"exit {devices.returncode}", devices.stderr)
        v = subprocess.run([tool, "--version"], capture_output=True, text=True)
        r.report("clnsa --version", v.returncode == 0 and v.stdout.startswith("clnsa "),
                 v.stdout.strip())
        # CLNSA_TRACE=1 names every kernel as it finishes (stderr), the demo's first included
        tr = subprocess.run([tool, "demo"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, CLNSA_TRACE="1"))
        traced = [x for x in tr.stderr.splitlines() if x.startswith("clnsa trace: ")]
        r.report("CLNSA_TRACE=1 names each kernel", tr.returncode == 0 and len(traced) >= 3 and
                 traced[0].startswith("clnsa trace: pool_mean ... done") and
                 all(" done" in x for x in traced), f"exit {tr.returncode}",
                 "\n".join(traced[:3]) or tr.stderr[-500:])
        for c in CASES:
            r.case(c, rng)
        for c in FD_CASES:
            r.finite_difference_case(c, rng)
        for c in GRAD_CASES:
            r.case(c, rng)

        good, kv, truncated, big, wrong_dk, short = bad_files(tmp, rng)
        out = os.path.join(tmp, "o.npy")
        base = ["run", "--k", kv, "--v", kv, "--out", out, "--block-size", "4"]
        r.error_case("truncated .npy is rejected", base + ["--q", truncated], 1, "truncated")
        r.error_case("big-endian .npy is rejected", base + ["--q", big], 1, "big-endian")
        r.error_case("missing --q prints usage", base, 2, "usage: clnsa run")
        r.error_case("a library error names its status", ["run", "--q", good, "--k", wrong_dk,
                     "--v", kv, "--out", out, "--block-size", "4"], 1, "clnsa run: ")
        r.error_case("an unknown device is refused", base + ["--q", good, "--device",
                     "no-such-device-xyz"], 1, "no OpenCL device matches")
        r.error_case("bad --dtype is a usage error", base + ["--q", good, "--dtype", "f64"], 2,
                     "--dtype")
        r.error_case("gates of the wrong rank are refused", base + ["--q", good, "--g-cmp", kv],
                     1, "expected 3")
        grads = ["--dq", os.path.join(tmp, "dq.npy"), "--dk", os.path.join(tmp, "dk.npy"),
                 "--dv", os.path.join(tmp, "dv.npy")]
        r.error_case("--do with TQ < TK: no backward", base + ["--q", short, "--do", short]
                     + grads, 1, "clnsa run: backward is undefined")
        r.error_case("--do without --dq is a usage error", base + ["--q", good, "--do", good]
                     + grads[2:], 2, "--do needs --dq")
        r.error_case("--dq without --do is a usage error", base + ["--q", good] + grads, 2,
                     "--dq needs --do")
        r.error_case("--dg-cmp without --g-cmp is a usage error", base + ["--q", good, "--do",
                     good, "--dg-cmp", os.path.join(tmp, "dg.npy")] + grads, 2,
                     "--dg-cmp needs --g-cmp")

    failed = r.results.count(False)
    print(f"{len(r.results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
