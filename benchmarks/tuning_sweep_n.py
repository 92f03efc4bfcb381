import sys, time, torch
from rlsedit.model.load import load_model
from rlsedit.editors import RLSEdit, RLSEditConfig
from rlsedit.locate.stats import second_moments
from rlsedit.requests import read_requests, target_text
from rlsedit.model.weights import get_W, set_W
lm = load_model("smollm2")
layers = (4,5,6,7,8)
st = second_moments(lm, list(layers), "../shared/data/corpus/enwiki_pages_2MB.jsonl", max_tokens=20000)
mom = {l: st[l].mom for l in layers}
reqs = read_requests("../shared/data/counterfact/counterfact-val.json", limit=int(sys.argv[1]))
def score(lm, reqs):
    top1=0; ps=0; spec=0; nspec=0
    tok=lm.tokenizer
    for r in reqs:
        ids = tok(r.text, return_tensors="pt")
        new = tok(target_text(r.target_new), add_special_tokens=False)["input_ids"][0]
        old = tok(target_text(r.target_true), add_special_tokens=False)["input_ids"][0]
        with torch.no_grad(): lp = torch.log_softmax(lm.model(**ids).logits[0,-1],-1)
        top1 += int(lp.argmax()==new); ps += int(lp[new]>lp[old])
        for q,a in zip(r.neighborhood, r.neighborhood_answers):
            ids = tok(q, return_tensors="pt"); aa = tok(target_text(a), add_special_tokens=False)["input_ids"][0]
            with torch.no_grad(): lq = torch.log_softmax(lm.model(**ids).logits[0,-1],-1)
            spec += int(lq[aa] > lq[new]); nspec+=1
    n=len(reqs); return dict(top1=top1/n, p_new_gt_true=ps/n, spec=spec/max(nspec,1))
W0 = {l: get_W(lm,l) for l in layers}
print("unedited", score(lm, reqs), flush=True)
prefixes=None
for n in [float(x) for x in sys.argv[2].split(",")]:
    for l in layers: set_W(lm,l,W0[l])
    t=time.time()
    ed = RLSEdit(lm, RLSEditConfig(layers=layers, mom2_update_weight=n, mom2_n_samples=20000), moments=mom, prefixes=prefixes)
    prefixes = ed.prefixes_
    bs=int(sys.argv[3])
    for i in range(0,len(reqs),bs): ed.partial_fit(reqs[i:i+bs])
    print("n", n, score(lm, reqs), "sec/edit", round((time.time()-t)/len(reqs),2), {l: round(d["drift_fro"],3) for l,d in ed.diagnostics().items()}, flush=True)
