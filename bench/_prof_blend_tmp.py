import sys, time, statistics, concurrent.futures as cf
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_blend import make_adapter, WEIGHTS
from lorahub.blend import blend
from lorahub.lowrank import factored_svd_sum, stack_terms, factored_svd, split_factors

def T(f, reps=5):
    f(); ts=[]
    for _ in range(reps):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3

torch.manual_seed(0)
for n,k in [(4096,4096),(11008,4096)]:
    B=torch.randn(n,128); A=torch.randn(128,k)
    print(n,k)
    print(' qrB', T(lambda: torch.linalg.qr(B)))
    print(' qrB r-only', T(lambda: torch.linalg.qr(B, mode='r')))
    print(' qrA', T(lambda: torch.linalg.qr(A.T)))
    print(' qrA contiguous', T(lambda: torch.linalg.qr(A.T.contiguous())))
    print(' gram', T(lambda: B.T@B))
    QB,RB=torch.linalg.qr(B)
    U=torch.randn(128,128)
    print(' backprod', T(lambda: QB@U))
    terms=[(0.7,B[:,:64],A[:64]),(0.3,B[:,64:],A[64:])]
    print(' stack', T(lambda: stack_terms(terms)))
    print(' factored_svd_sum', T(lambda: factored_svd_sum(terms)))
a = make_adapter(64, 0, alpha=128.0, use_rslora=False, blocks=4)
b = make_adapter(64, 1, alpha=16.0, use_rslora=True, blocks=4)
print('blend 28 layers ms/layer', T(lambda: blend([a,b], WEIGHTS, rank=64, device='cpu'), 3)/28)
def layer_job(t):
    la, lb = a.layers[t], b.layers[t]
    terms=[(0.7*la.scale, *la.factors()), (0.3*lb.scale, *lb.factors())]
    s=factored_svd_sum(terms); return split_factors(s, 64)
targets=list(a.layers)
print('raw loop ms/layer', T(lambda: [layer_job(t) for t in targets],3)/28)
for workers, threads in [(16,1),(8,2),(4,4)]:
    old=torch.get_num_threads(); torch.set_num_threads(threads)
    with cf.ThreadPoolExecutor(workers) as ex:
        print(f'pool {workers}x{threads} ms/layer', T(lambda: list(ex.map(layer_job, targets)),3)/28)
    torch.set_num_threads(old)
