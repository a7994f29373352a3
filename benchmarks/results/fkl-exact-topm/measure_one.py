"""Time fused CKD fkl fwd+bwd (N=256, H=256, V=49152, k=m=100, fp32, 1 thread) from the checkout argv[1]: python measure_one.py TREE torch|cpp float32 REPS; prints JSON."""
import json, math, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import star_kernels as sk
assert sk.__file__.startswith(sys.argv[1]), sk.__file__
backend, dtype, reps = sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4])
N, H, V, K = 256, 256, 49152, 100
g = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
weight = (torch.randn(V, H, generator=g) * 2 / math.sqrt(H)).to(dtype).requires_grad_()
stride = V // K
ids = (torch.randint(0, V, (N, 1), generator=g) + torch.arange(K) * stride) % V
tlp = (torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) + math.log(0.9)).sort(1, descending=True).values
def call():
    hidden.grad = weight.grad = None
    loss = sk.fused_linear_ckd_loss(hidden, weight, ids, tlp, tail_coef=10.0, student_topm=100, backend=backend)
    loss.backward()
    return loss
loss = call()  # warm-up
times = []
for _ in range(reps):
    t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
print(json.dumps({"tree": sys.argv[1], "backend": backend, "dtype": sys.argv[3], "loss": float(loss.detach()),
                  "times_s": times}))
