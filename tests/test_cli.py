#!/usr/bin/env python3
"""End-to-end test of the `clnsa` tool: writes .npy inputs, runs `clnsa run`, and compares
o and the block index sets with the float64 NumPy reference (tests/nsa_numpy.py).

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
from nsa_numpy import nsa_forward  # noqa: E402

TOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2}


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
             scale=None, file_dtype="float32", int_dtype="int32")
    c.update(kw)
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
        x["g_" + {"c": "cmp", "s": "slc", "w": "swa"}[g]] = \
            1 / (1 + np.exp(-rng.uniform(-3, 3, (B, TQ, HQ))))
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


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def reference(c, seen, block_indices=None):
    kw = {name: seen[name] for name in ("g_cmp", "g_slc", "g_swa", "block_counts")
          if name in seen}
    return nsa_forward(seen["q"], seen["k"], seen["v"], block_size=c["BS"], block_count=c["S"],
                       window=c["W"], scale=c["scale"], cu_seqlens=c["cu_q"],
                       cu_seqlens_k=c["cu_k"],
                       block_indices=block_indices if block_indices is not None
                       else seen.get("block_indices"), **kw)


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

    def forward_case(self, c, rng):
        d = tempfile.mkdtemp(dir=self.tmp)
        x = make_inputs(c, rng)
        args, seen = write_inputs(c, x, d)
        out, out_idx = os.path.join(d, "o.npy"), os.path.join(d, "idx.npy")
        p, secs = self.run(["run"] + args + ["--out", out, "--out-block-indices", out_idx])
        if p.returncode != 0:
            self.report(c["name"], False, f"exit {p.returncode}",
                        p.stderr + "\ncommand: clnsa run " + " ".join(args))
            return
        o, idx = np.load(out), np.load(out_idx)
        ref = reference(c, seen)
        tol = TOL[c["dtype"]]
        problems = []
        if idx.shape != ref.block_indices.shape or idx.dtype != np.int32:
            problems.append(f"block indices {idx.dtype}{idx.shape}, expected "
                            f"int32{ref.block_indices.shape}")
            same = near = 0
        elif c["given"]:
            same, near = int(np.prod(idx.shape[:-1])), 0
            if not np.array_equal(idx, x["block_indices"]):
                problems.append("block indices written differ from those given")
        else:
            same, near, bad = compare_selection(idx, ref.block_indices, ref.importance, tol)
            problems += bad[:5] + ([f"... {len(bad) - 5} more"] if len(bad) > 5 else [])
        if near and not problems:  # near ties went the other way: o follows the device
            ref = reference(c, seen, block_indices=idx)
        err = rel_error(o, ref.o) if o.shape == ref.o.shape else float("inf")
        if o.shape != ref.o.shape or o.dtype != np.float32:
            problems.append(f"o is {o.dtype}{o.shape}, expected float32{ref.o.shape}")
        if not err < tol:
            problems.append(f"relative error {err:.3e} >= {tol:.0e}")
        detail = (f"{c['dtype']} rel err {err:.2e} (tol {tol:.0e}), sets {same} same"
                  + (f", {near} near ties" if near else "") + f", {secs:.1f} s")
        self.report(c["name"], not problems, detail, "\n".join(problems))

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
    return good, kv, truncated, big, wrong_dk


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
    print(f"1..{len(CASES) + 9}", flush=True)

    with tempfile.TemporaryDirectory(prefix="clnsa-cli-") as tmp:
        r = Runner(tool, tmp)
        r.report("clnsa devices lists a default device", devices.returncode == 0 and
                 bool(default), f"exit {devices.returncode}", devices.stderr)
        v = subprocess.run([tool, "--version"], capture_output=True, text=True)
        r.report("clnsa --version", v.returncode == 0 and v.stdout.startswith("clnsa "),
                 v.stdout.strip())
        for c in CASES:
            r.forward_case(c, rng)

        good, kv, truncated, big, wrong_dk = bad_files(tmp, rng)
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

    failed = r.results.count(False)
    print(f"{len(r.results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
