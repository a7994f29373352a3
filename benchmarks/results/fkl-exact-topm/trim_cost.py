"""In one process (HEAD tree): torch-backend CKD fkl fwd+bwd with the exact top-m tie trim
as is vs the trim replaced by a no-op (same inputs, no ties in fp32, so same loss); interleaved."""
import math, sys, time, json
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import star_kernels as sk
from star_kernels import _torch_rows
N, H, V, K = 256, 256, 49152, 100
g = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=g).requires_grad_()
weight = (torch.randn(V, H, generator=g) * 2 / math.sqrt(H)).requires_grad_()
ids = (torch.randint(0, V, (N, 1), generator=g) + torch.arange(K) * (V // K)) % V
tlp = (torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) + math.log(0.9)).sort(1, descending=True).values
real = _torch_rows._trim_ties
def call():
    hidden.grad = weight.grad = None
    loss = sk.fused_linear_ckd_loss(hidden, weight, ids, tlp, tail_coef=10.0, student_topm=100, backend="torch")
    loss.backward(); return float(loss.detach())
res = {"with_trim": [], "no_trim": []}
losses = {}
call()
for rnd in range(8):
    for name in (("with_trim", "no_trim") if rnd % 2 == 0 else ("no_trim", "with_trim")):
        _torch_rows._trim_ties = real if name == "with_trim" else (lambda *a, **k: None)
        t0 = time.perf_counter(); losses[name] = call(); res[name].append(time.perf_counter() - t0)
_torch_rows._trim_ties = real
# the trim alone on one chunk of logits
z = (hidden.detach() @ weight.detach().T)
conf = torch.ones(N, V, dtype=torch.bool); thr = z.topk(100, dim=1).values[:, -1:]; exc = torch.zeros(N, dtype=torch.int32)
t = []
for _ in range(5):
    t0 = time.perf_counter(); real(z, conf, thr, exc); t.append(time.perf_counter() - t0)
print(json.dumps({"best_s": {k: min(v) for k, v in res.items()}, "median_s": {k: sorted(v)[len(v)//2] for k, v in res.items()},
                  "losses": losses, "trim_alone_best_s": min(t), "loadavg": open("/proc/loadavg").read().split()[:3]}))
