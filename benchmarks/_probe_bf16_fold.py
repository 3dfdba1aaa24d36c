import torch, sys
sys.path.insert(0, "tests")
from test_lora_native import hf_tiny, ids
from gpt2opt_lib import lora as L, model as N, distill
dev = "cuda"
x = ids(4, 32).to(dev)
loss_fn = distill.make_lm_loss_fn(64)
for fold in (True, False):
    res = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = L.apply_lora_native(N.from_hf(hf_tiny()).to(dev), rank=4, dropout=0.0, base_dtype=torch.bfloat16).train()
        for mod in L.native_lora_modules(m).values():
            mod.fold = fold
        g = torch.Generator(device=dev).manual_seed(5)
        with torch.no_grad():
            for mod in L.native_lora_modules(m).values():
                mod.lora_B.weight.normal_(0, 0.05, generator=g)
        if compiled:
            m.compile(dynamic=False)
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = loss_fn(m, x)
        loss.backward()
        res.append((loss.item(), torch.cat([p.grad.float().flatten() for n, p in m.named_parameters() if p.requires_grad])))
    (l0, g0), (l1, g1) = res
    print("fold", fold, "loss", l0, l1, "rel grad diff", ((g1 - g0).norm() / g0.norm()).item())
