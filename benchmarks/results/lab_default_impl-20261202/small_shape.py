import time, statistics, torch, normlab
torch.set_num_threads(1)
x = torch.randn(16, 64, 128, requires_grad=True); g = torch.randn(16, 64, 128)
mods = {"torch.LayerNorm": torch.nn.LayerNorm(128), "LayerNorm cpu": normlab.LayerNorm(128, impl="cpu"),
        "LayerNorm composite": normlab.LayerNorm(128, impl="composite"),
        "RMSNorm cpu": normlab.RMSNorm(128, impl="cpu"), "RMSNorm composite": normlab.RMSNorm(128, impl="composite"),
        "DyT cpu": normlab.DyT(128, impl="cpu"), "DyT composite": normlab.DyT(128, impl="composite")}
def fwd(m):
    with torch.no_grad(): m(x)
def fb(m):
    m(x).backward(g)
res = {(k, p): [] for k in mods for p in ("fwd", "fwd+bwd")}
for _ in range(3):
    for m in mods.values(): fwd(m); fb(m)
for rep in range(15):
    for k, m in mods.items():
        for p, f in (("fwd", fwd), ("fwd+bwd", fb)):
            t0 = time.perf_counter()
            for _ in range(50): f(m)
            res[(k, p)].append((time.perf_counter() - t0) / 50 * 1e6)
for (k, p), v in res.items():
    q = statistics.quantiles(v, n=5)
    print(f"{k:22s} {p:8s} p20/p50/p80 us: {q[0]:.0f}/{statistics.median(v):.0f}/{q[3]:.0f}")
